//! `husk`: an OCI runtime that runs each container in its own KVM microVM.

mod vmm;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
