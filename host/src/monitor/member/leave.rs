//! `husk delete` of a pod's later container: out of the sandbox's VM (if it still runs) and
//! its files out of the sandbox's share, before the state directory goes.

use std::path::Path;

use super::place;
use crate::error_chain;
use crate::monitor::api::{MonitorReply, MonitorRequest};
use crate::monitor::{client, overlay};
use crate::oci::pod;
use crate::oci::sockets::SocketDir;
use crate::oci::state;

/// Takes a pod's later container (state directory `dir`, of root `root`) out of its
/// sandbox's VM, if the sandbox still runs, and its files out of the sandbox's share: what
/// `husk delete` does before it removes the directory. Nothing to do for a container that is
/// not a pod's later one. Must be called while the process has one thread.
pub fn leave(dir: &Path) {
    let pod = match pod::membership(dir) {
        Ok(Some(pod)) => pod,
        Ok(None) => return,
        Err(e) => {
            eprintln!("husk: {}", error_chain(&e));
            return;
        }
    };
    let Ok(sandbox_id) = husk_proto::ContainerId::new(pod.sandbox.clone()) else {
        return;
    };
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let root = dir.parent().unwrap_or(Path::new("."));
    let Ok(sandbox_dir) = std::path::absolute(root.join(&pod.sandbox)) else {
        return;
    };
    let sandbox_pid = state::read_state(&sandbox_dir, &sandbox_id)
        .ok()
        .filter(state::monitor_alive)
        .and_then(|st| st.pid);
    if sandbox_pid.is_some() && pod.container != 0 {
        let request = MonitorRequest::ForContainer {
            container: pod.container,
            request: Box::new(MonitorRequest::Remove),
        };
        let outcome = SocketDir::open(&sandbox_dir)
            .map_err(|e| e.to_string())
            .and_then(|s| client::request(&s.monitor(), &request));
        match outcome {
            Ok((MonitorReply::Ok, _)) => {}
            Ok((MonitorReply::Error(e), _)) | Err(e) => {
                eprintln!("husk: taking {id} out of its pod's VM: {e}");
            }
            Ok((other, _)) => {
                eprintln!("husk: taking {id} out of its pod's VM: unexpected reply {other:?}");
            }
        }
    }
    place::unplace(&id, &sandbox_dir, sandbox_pid);
    if let Some(workdir) = pod.workdir {
        // Only a directory named for this container (a record of ours, but checked anyway).
        let ours = workdir.is_absolute()
            && workdir.file_name() == Some(std::ffi::OsStr::new(&overlay::workdir_name(&id)));
        if ours {
            if let Err(e) = std::fs::remove_dir_all(&workdir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("husk: removing {}: {e}", workdir.display());
            }
        } else {
            eprintln!(
                "husk: {} is not a work directory of {id}: left",
                workdir.display()
            );
        }
    }
}
