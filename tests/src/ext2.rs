//! ext2 test disks: the data module `data:NAME:SIZE:ext2`.
//!
//! An ext2 filesystem with fixed files, for a Linux guest to mount from the virtio block device
//! the module backs (`block=NAME`). `mke2fs -d` (e2fsprogs) makes it from a staging directory:
//!
//! | path | bytes | content | md5 |
//! |---|---|---|---|
//! | `hello.txt` | 41 | the line `hello from the rustyvisor ext2 test disk` | `24a2ef6b13032bc217c4c937251d8111` |
//! | `pattern.bin` | 102400 | `guest_abi::testdata::pattern_byte(offset)` for offsets 0 to 102399 (the first 100 KiB of a `pattern` disk) | `63fc76b490fe16fb4c13fac80b764090` |
//! | `sub/nested.txt` | 25 | the line `a file in a subdirectory` | `6581ce5933270d44a08db6bc71eba942` |
//!
//! and mke2fs's empty `lost+found`. The filesystem has 1 KiB blocks, 256-byte inodes, only the
//! `filetype` and `sparse_super` features (Linux 3.10's ext2 mounts it read-write), no reserved
//! blocks and no default mount options; label [`LABEL`], UUID [`UUID`], directory hash seed
//! [`HASH_SEED`]; every file and directory belongs to root with mode 0644 or 0755, and every
//! time stamp is [`EPOCH`]. With one version of e2fsprogs the image is the same byte for byte on
//! every run: mke2fs reads its configuration from here (`MKE2FS_CONFIG`, not
//! `/etc/mke2fs.conf`), its clock is fixed (`E2FSPROGS_FAKE_TIME`), and `debugfs` then sets the
//! owner and the times mke2fs copied from the staging files.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::err;
use crate::error::{Context, Result};

/// The one line of `hello.txt`.
pub const HELLO: &str = "hello from the rustyvisor ext2 test disk\n";

/// The one line of `sub/nested.txt`.
pub const NESTED: &str = "a file in a subdirectory\n";

/// The size of `pattern.bin`.
pub const PATTERN_SIZE: u64 = 100 * 1024;

/// Every file on the disk, with its md5 (what `md5sum` in the guest prints).
pub const FILES: [(&str, &str); 3] = [
    ("hello.txt", "24a2ef6b13032bc217c4c937251d8111"),
    ("pattern.bin", "63fc76b490fe16fb4c13fac80b764090"),
    ("sub/nested.txt", "6581ce5933270d44a08db6bc71eba942"),
];

/// The volume label.
pub const LABEL: &str = "rvtest";

/// The filesystem UUID.
pub const UUID: &str = "5275ee7a-e672-4000-8000-000000000001";

/// The seed of the directory hash (`-E hash_seed=`).
pub const HASH_SEED: &str = "5275ee7a-e672-4000-8000-000000000002";

/// Every time stamp on the disk, in seconds since 1970 (2023-11-14 22:13:20 UTC).
pub const EPOCH: u64 = 1_700_000_000;

/// The smallest ext2 data module: the files and the filesystem's own blocks fit with room to
/// write.
pub const MIN_SIZE: u64 = 1 << 20;

/// The e2fsprogs programs that make the image.
pub const TOOLS: [&str; 2] = ["mke2fs", "debugfs"];

/// The configuration mke2fs reads instead of `/etc/mke2fs.conf`, so that the host's defaults
/// (features, inode size) do not leak into the image. `small` and `floppy` are the size classes
/// mke2fs picks for images under 512 MiB; each must be defined or mke2fs warns.
const MKE2FS_CONF: &str = "\
[defaults]
\tbase_features = sparse_super,filetype
\tblocksize = 1024
\tinode_size = 256
\tinode_ratio = 4096

[fs_types]
\text2 = {
\t\tinode_size = 256
\t}
\tsmall = {
\t\tinode_size = 256
\t}
\tfloppy = {
\t\tinode_size = 256
\t}
";

/// The files to stage, in order: path relative to the filesystem's root, and bytes.
pub fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("hello.txt", HELLO.as_bytes().to_vec()),
        (
            "pattern.bin",
            (0..PATTERN_SIZE)
                .map(guest_abi::testdata::pattern_byte)
                .collect(),
        ),
        ("sub/nested.txt", NESTED.as_bytes().to_vec()),
    ]
}

/// The directories the files need, parents first, without the root.
fn dirs() -> Vec<&'static str> {
    let mut dirs = Vec::new();
    for (path, _) in FILES {
        let mut end = 0;
        while let Some(slash) = path[end..].find('/') {
            end += slash;
            if !dirs.contains(&&path[..end]) {
                dirs.push(&path[..end]);
            }
            end += 1;
        }
    }
    dirs
}

/// A checksum of everything that decides the image (the files, mke2fs's configuration and
/// arguments, the debugfs commands): generated images are cached under a name holding it.
pub fn content_hash() -> u32 {
    use guest_abi::testdata::{FNV_OFFSET, fnv1a};
    let mut hash = fnv1a(FNV_OFFSET, MKE2FS_CONF.as_bytes());
    for arg in mke2fs_args(Path::new("S"), Path::new("I")) {
        hash = fnv1a(hash, arg.as_bytes());
        hash = fnv1a(hash, &[0]);
    }
    hash = fnv1a(hash, debugfs_commands().as_bytes());
    for (path, bytes) in files() {
        hash = fnv1a(hash, path.as_bytes());
        hash = fnv1a(hash, &(bytes.len() as u64).to_le_bytes());
        hash = fnv1a(hash, &bytes);
    }
    hash
}

/// mke2fs's arguments for the staging directory `stage` and the image file `image` (which
/// exists and has the image's size: mke2fs fills all of it).
fn mke2fs_args(stage: &Path, image: &Path) -> Vec<String> {
    [
        "-q",
        "-F",
        "-t",
        "ext2",
        "-m",
        "0",
        "-L",
        LABEL,
        "-U",
        UUID,
        "-E",
        &format!("hash_seed={HASH_SEED},root_owner=0:0"),
        "-d",
        &stage.display().to_string(),
        &image.display().to_string(),
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// debugfs commands that give every staged file and directory root as its owner and [`EPOCH`]
/// as its times (mke2fs copies them from the staging files, and reading a file there updates
/// its access time), and clear the default mount options mke2fs always sets.
fn debugfs_commands() -> String {
    let mut cmds = String::from("ssv default_mount_opts 0\n");
    let paths = std::iter::once("")
        .chain(dirs())
        .chain(FILES.map(|(p, _)| p));
    for path in paths {
        for field in ["atime", "ctime", "mtime"] {
            cmds += &format!("sif /{path} {field} @{EPOCH}\n");
        }
        cmds += &format!("sif /{path} uid 0\nsif /{path} gid 0\n");
    }
    cmds
}

/// Where `program` is: a `PATH` directory, or `/usr/sbin` or `/sbin` (where Debian puts
/// e2fsprogs, often not on a user's `PATH`).
pub fn find_tool(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|file| {
            file.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The error for missing e2fsprogs programs.
fn missing_tools(missing: &[&str]) -> crate::Error {
    err!(
        "an ext2 data module (data:NAME:SIZE:ext2) needs {} from e2fsprogs, not found on PATH \
         or in /usr/sbin or /sbin; install e2fsprogs:\n    \
         sudo apt-get install e2fsprogs",
        missing
            .iter()
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(" and ")
    )
}

/// Writes the files under `stage` (which must not exist) with modes 0644 and 0755.
pub fn stage(stage: &Path) -> Result<()> {
    let mode = |path: &Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .context(|| format!("setting the mode of {}", path.display()))
    };
    fs::create_dir_all(stage).context(|| format!("creating {}", stage.display()))?;
    mode(stage, 0o755)?;
    for dir in dirs() {
        let dir = stage.join(dir);
        fs::create_dir(&dir).context(|| format!("creating {}", dir.display()))?;
        mode(&dir, 0o755)?;
    }
    for (path, bytes) in files() {
        let file = stage.join(path);
        fs::write(&file, bytes).context(|| format!("writing {}", file.display()))?;
        mode(&file, 0o644)?;
    }
    Ok(())
}

/// Runs `program` from e2fsprogs; fails with its output unless it succeeds with nothing on
/// stderr but lines starting with one of `quiet`. A warning counts as a failure (mke2fs
/// warns there when its configuration lacks something), and so does any other line from
/// debugfs, which prints its version there and reports a failed command there without
/// failing.
fn run(program: &Path, command: &mut Command, quiet: &[&str]) -> Result<()> {
    let output = command
        .env("E2FSPROGS_FAKE_TIME", EPOCH.to_string())
        .output()
        .context(|| format!("running {}", program.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let noise = stderr
        .lines()
        .any(|l| !l.trim().is_empty() && !quiet.iter().any(|q| l.starts_with(q)));
    let what = match (output.status.success(), noise) {
        (true, false) => return Ok(()),
        (true, true) => "reported a problem".to_string(),
        (false, _) => format!("failed ({})", output.status),
    };
    Err(err!(
        "{} {what}:\n{}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        stderr.trim_end()
    ))
}

/// Makes the ext2 image of `size` bytes at `image`, using the directory `work` (created, then
/// removed) for the staged files and mke2fs's configuration.
pub fn write_image(image: &Path, size: u64, work: &Path) -> Result<()> {
    let tools: Vec<Option<PathBuf>> = TOOLS.iter().map(|t| find_tool(t)).collect();
    let missing: Vec<&str> = TOOLS
        .iter()
        .zip(&tools)
        .filter(|(_, found)| found.is_none())
        .map(|(t, _)| *t)
        .collect();
    let [Some(mke2fs), Some(debugfs)] = &tools[..] else {
        return Err(missing_tools(&missing));
    };
    if size < MIN_SIZE {
        return Err(err!("an ext2 data module must be at least 1 MiB"));
    }
    if work.exists() {
        fs::remove_dir_all(work).context(|| format!("removing {}", work.display()))?;
    }
    let staged = work.join("root");
    stage(&staged)?;
    let conf = work.join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF).context(|| format!("writing {}", conf.display()))?;
    let cmds = work.join("debugfs.cmds");
    fs::write(&cmds, debugfs_commands()).context(|| format!("writing {}", cmds.display()))?;
    // mke2fs takes the size of an existing file (and says nothing about creating one).
    fs::File::create(image)
        .and_then(|f| f.set_len(size))
        .context(|| format!("creating {}", image.display()))?;
    run(
        mke2fs,
        Command::new(mke2fs)
            .args(mke2fs_args(&staged, image))
            .env("MKE2FS_CONFIG", &conf),
        &[],
    )?;
    run(
        debugfs,
        Command::new(debugfs)
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(image),
        &["debugfs "],
    )?;
    fs::remove_dir_all(work).context(|| format!("removing {}", work.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch directory.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("rustyvisor-ext2-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_are_the_documented_ones() {
        let files = files();
        let names: Vec<&str> = files.iter().map(|(p, _)| *p).collect();
        assert_eq!(names, FILES.map(|(p, _)| p));
        assert_eq!(files[0].1, b"hello from the rustyvisor ext2 test disk\n");
        assert_eq!(files[0].1.len(), 41);
        assert_eq!(files[1].1.len(), 102_400);
        assert_eq!(files[1].1[1000], guest_abi::testdata::pattern_byte(1000));
        assert_eq!(files[2].1, b"a file in a subdirectory\n");
        assert_eq!(dirs(), ["sub"]);
    }

    #[test]
    fn md5_sums_are_the_documented_ones() {
        // md5sum (coreutils) is on every Linux host; the sums are what the guest prints.
        let dir = scratch("md5");
        stage(&dir.join("root")).unwrap();
        for (path, md5) in FILES {
            let out = Command::new("md5sum")
                .arg(dir.join("root").join(path))
                .output()
                .unwrap();
            let out = String::from_utf8(out.stdout).unwrap();
            assert_eq!(out.split_whitespace().next(), Some(md5), "{path}");
        }
        let mode = |p: &str| {
            fs::metadata(dir.join("root").join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("sub"), 0o755);
        assert_eq!(mode("sub/nested.txt"), 0o644);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn debugfs_fixes_every_staged_path() {
        let cmds = debugfs_commands();
        assert!(cmds.starts_with("ssv default_mount_opts 0\n"));
        for path in ["/", "/sub", "/hello.txt", "/pattern.bin", "/sub/nested.txt"] {
            assert!(
                cmds.contains(&format!("sif {path} ctime @1700000000\n")),
                "{path}"
            );
            assert!(cmds.contains(&format!("sif {path} uid 0\n")), "{path}");
        }
        assert_eq!(cmds.lines().count(), 1 + 5 * 5);
    }

    #[test]
    fn e2fsprogs_problems_on_stderr_fail() {
        let sh = |script: &str| {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            run(Path::new("sh"), &mut c, &["debugfs "])
        };
        assert!(sh("echo 'debugfs 1.47.0 (5-Feb-2023)' >&2; echo done").is_ok());
        let e = sh("echo 'debugfs 1.47.0' >&2; echo '/x: File not found by ext2_lookup' >&2")
            .unwrap_err();
        assert!(e.message().starts_with("sh reported a problem:"), "{e}");
        assert!(e.message().contains("/x: File not found"), "{e}");
        let e = sh("echo bad size >&2; exit 3").unwrap_err();
        assert!(
            e.message().starts_with("sh failed (exit status: 3):"),
            "{e}"
        );
    }

    #[test]
    fn missing_tools_say_what_to_install() {
        let e = missing_tools(&["mke2fs", "debugfs"]);
        assert!(
            e.message()
                .contains("needs `mke2fs` and `debugfs` from e2fsprogs"),
            "{e}"
        );
        assert!(
            e.message().ends_with("sudo apt-get install e2fsprogs"),
            "{e}"
        );
    }

    #[test]
    fn image_is_reproducible() {
        if TOOLS.iter().any(|t| find_tool(t).is_none()) {
            eprintln!("e2fsprogs is not installed: image_is_reproducible checks nothing");
            return;
        }
        let dir = scratch("image");
        let make = |n: &str| {
            let image = dir.join(format!("{n}.img"));
            write_image(&image, MIN_SIZE, &dir.join(format!("work-{n}"))).unwrap();
            fs::read(image).unwrap()
        };
        let a = make("a");
        // The staging files of the second image are younger.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let b = make("b");
        assert_eq!(a.len() as u64, MIN_SIZE);
        assert!(a == b, "two images differ");
        // The superblock at 1024: magic 0xEF53, the label, no default mount options.
        let sb = &a[1024..2048];
        assert_eq!(&sb[0x38..0x3a], &[0x53, 0xef]);
        assert_eq!(&sb[0x78..0x78 + LABEL.len()], LABEL.as_bytes());
        assert_eq!(&sb[0x100..0x104], &[0, 0, 0, 0]);
        // The files' bytes are in the image (the first 12 blocks of a file are contiguous
        // here; the indirect block may follow them).
        for (_, bytes) in files() {
            let head = &bytes[..bytes.len().min(12 * 1024)];
            assert!(a.windows(head.len()).any(|w| w == head));
        }
        assert!(!dir.join("work-a").exists());
        let e = write_image(&dir.join("small.img"), MIN_SIZE - 1024, &dir.join("w")).unwrap_err();
        assert!(e.message().contains("at least 1 MiB"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }
}
