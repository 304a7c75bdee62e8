//! Option parsing, clean relative paths, and resolution that stays inside the root.

use super::*;

fn opts(words: &[&str]) -> MountOptions {
    parse_options(&words.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

#[test]
fn options_split_into_flags_propagation_and_data() {
    let o = opts(&[
        "nosuid",
        "noexec",
        "mode=755",
        "size=65536k",
        "rprivate",
        "ro",
    ]);
    assert_eq!(
        o.flags,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY
    );
    assert_eq!(o.data, "mode=755,size=65536k");
    assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
    let o = opts(&["rbind", "rw", "ro", "rw"]);
    assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
    assert!(o.is_bind());
    assert!(opts(&["ro", "rro"]).flags.contains(MsFlags::MS_RDONLY));
}

#[test]
fn propagation_words() {
    assert_eq!(
        propagation_flags("rslave"),
        Some(MsFlags::MS_SLAVE | MsFlags::MS_REC)
    );
    assert_eq!(propagation_flags("shared"), Some(MsFlags::MS_SHARED));
    assert_eq!(propagation_flags("ro"), None);
    assert_eq!(propagation_flags("bogus"), None);
}

#[test]
fn clean_relative_paths() {
    assert!(is_clean_relative("rootfs"));
    assert!(is_clean_relative("mounts/3"));
    assert!(!is_clean_relative("/etc"));
    assert!(!is_clean_relative("a/../../etc"));
    assert!(!is_clean_relative(".."));
}

#[test]
fn resolution_stays_inside_the_root_whatever_the_links_say() {
    let dir = tempfile::tempdir().unwrap();
    let root_path = dir.path().join("root");
    std::fs::create_dir_all(root_path.join("etc")).unwrap();
    std::fs::write(root_path.join("etc/shadow"), "inside").unwrap();
    // Hostile links: absolute, relative climbing out, and a chain.
    std::os::unix::fs::symlink("/etc", root_path.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../../../etc", root_path.join("climb")).unwrap();
    std::os::unix::fs::symlink("climb", root_path.join("chain")).unwrap();
    let root = nix::fcntl::open(
        &root_path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    for p in [
        "abs/shadow",
        "climb/shadow",
        "chain/shadow",
        "../../etc/shadow",
        "/etc/shadow",
    ] {
        let fd = resolve_in_root(&root, Path::new(p), Create::Nothing).unwrap();
        let real = std::fs::read_link(proc_fd_path(&fd)).unwrap();
        assert_eq!(real, root_path.join("etc/shadow"), "{p}");
    }
    // Creating through a link creates inside the root.
    let fd = resolve_in_root(&root, Path::new("abs/new/dir"), Create::Dir).unwrap();
    let real = std::fs::read_link(proc_fd_path(&fd)).unwrap();
    assert_eq!(real, root_path.join("etc/new/dir"));
    let fd = resolve_in_root(&root, Path::new("climb/hosts"), Create::File).unwrap();
    let real = std::fs::read_link(proc_fd_path(&fd)).unwrap();
    assert_eq!(real, root_path.join("etc/hosts"));
    assert!(root_path.join("etc/hosts").is_file());
}
