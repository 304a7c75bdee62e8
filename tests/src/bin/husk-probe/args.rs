//! The command line (see the crate docs): the monitor's pid and thread, and what else the
//! test wants tried.

use crate::exit::die;

#[derive(Debug, Default)]
pub(crate) struct Args {
    pub(crate) pid: i32,
    pub(crate) tid: i32,
    pub(crate) victim: Option<i32>,
    pub(crate) abstract_name: Option<String>,
    pub(crate) tcp: Option<u16>,
    pub(crate) paths: Vec<String>,
}

pub(crate) fn args() -> Args {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| die(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--pid" => a.pid = value().parse().unwrap_or_else(|_| die("--pid")),
            "--tid" => a.tid = value().parse().unwrap_or_else(|_| die("--tid")),
            "--victim" => a.victim = Some(value().parse().unwrap_or_else(|_| die("--victim"))),
            "--abstract" => a.abstract_name = Some(value()),
            "--tcp" => a.tcp = Some(value().parse().unwrap_or_else(|_| die("--tcp"))),
            "--path" => a.paths.push(value()),
            other => die(&format!("unknown argument {other}")),
        }
    }
    if a.pid <= 0 || a.tid <= 0 {
        die("--pid and --tid are needed");
    }
    a
}
