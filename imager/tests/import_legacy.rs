//! `import` of images made by the real tools: Clonezilla (Debian's
//! `clonezilla`, `ocs-sr saveparts` on loop devices, split at 64 MB),
//! OpenGnsys (`partclone | lzop` with its sum files), FOG (partclone +
//! zstd/pigz, `sfdisk -d`, `d1.mbr`), and whole stores with `--all`. Every
//! imported image is restored with aula-imager and compared byte for byte
//! with the source, or, for NTFS (whose backup boot sector partclone does
//! not carry), with partclone's own restore of the same stream. Corrupt or
//! incomplete sources are refused naming the file, and publish nothing.

mod support;

use std::path::Path;

use support::*;

const MIB: u64 = 1 << 20;

fn require_root() {
    assert!(
        is_root(),
        "this test needs root (loop devices, ocs-sr, ntfs-3g): run it as root, as scripts/test does"
    );
}

/// A loop device detached on drop.
struct Loop(String);
impl Loop {
    fn new(file: &Path) -> Loop {
        Loop(
            sh_out(&format!("losetup -f --show {}", file.display()))
                .trim()
                .to_string(),
        )
    }
    fn name(&self) -> &str {
        self.0.trim_start_matches("/dev/")
    }
}
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// An NTFS filesystem image of `size` bytes holding a few files.
fn make_ntfs(img: &Path, size: u64, tree: &Path) {
    sh(&format!("truncate -s {size} {}", img.display()));
    sh(&format!(
        "mkntfs -q -F -f -L aula {} >/dev/null 2>&1",
        img.display()
    ));
    let mnt = img.with_extension("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    sh(&format!("ntfs-3g {} {}", img.display(), mnt.display()));
    let r = std::process::Command::new("cp")
        .args([
            "-r",
            &format!("{}/.", tree.display()),
            &mnt.display().to_string(),
        ])
        .status();
    sh(&format!("umount {}", mnt.display()));
    assert!(r.expect("cp").success(), "copying files onto NTFS failed");
}

/// What partclone itself restores from `stream_cmd` (a shell pipeline
/// printing the plain partclone stream) onto a zeroed file of `size`.
fn partclone_restore(stream_cmd: &str, size: u64, out: &Path) {
    sh(&format!("truncate -s {size} {}", out.display()));
    sh(&format!(
        "{stream_cmd} | partclone.restore -s - -O {} -L /dev/null >/dev/null 2>&1",
        out.display()
    ));
}

fn assert_same(a: &Path, b: &Path) {
    assert!(
        sha256_file(a) == sha256_file(b),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

fn image_names(repo: &str) -> Vec<String> {
    let o = imager_ok(&["list", "--repo", repo, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|i| i["name"].as_str().expect("name").to_string())
        .collect()
}

fn chunk_files(repo: &Path) -> usize {
    sh_out(&format!("find {}/chunks -type f | wc -l", repo.display()))
        .trim()
        .parse()
        .expect("count")
}

#[test]
fn clonezilla_saveparts_split_at_64_mb_imports_restores_identical_and_refuses_corrupt_parts() {
    require_root();
    let t = Tmp::new();
    // ext4 with ~70 MB of incompressible files: its gzip stream is split
    // into several 64 MB parts. NTFS beside it.
    let tree = t.p("tree");
    make_tree(&tree, 5, 195);
    let ext4 = t.p("ext4.img");
    mkfs_ext4(&ext4, 0, 256 * MIB, Some(&tree));
    let small = t.p("small");
    make_tree(&small, 9, 6);
    let ntfs = t.p("ntfs.img");
    make_ntfs(&ntfs, 64 * MIB, &small);
    let cz = t.p("partimag");
    std::fs::create_dir_all(&cz).expect("mkdir");
    {
        let (l1, l2) = (Loop::new(&ext4), Loop::new(&ntfs));
        sh(&format!(
            "ocs-sr -batch -or {} -q2 -z1p -i 64 -sfsck -scs -senc -p true saveparts lab '{} {}' > {} 2>&1 || (tail -30 {}; false)",
            cz.display(),
            l1.name(),
            l2.name(),
            t.s("ocs.log"),
            t.s("ocs.log")
        ));
        let dir = cz.join("lab");
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        let ext_parts = names
            .iter()
            .filter(|n| n.starts_with(&format!("{}.ext4-ptcl-img.gz.", l1.name())))
            .count();
        assert!(ext_parts >= 2, "the ext4 image was not split: {names:?}");
        assert!(ext_parts >= 3, "want three parts or more: {names:?}");
        // Rename the devices as a lab's would be (sda1, sda2): the loop
        // numbers differ from run to run.
        for n in &names {
            for (l, d) in [(l1.name(), "sda1"), (l2.name(), "sda2")] {
                if let Some(rest) = n.strip_prefix(&format!("{l}.")) {
                    std::fs::rename(dir.join(n), dir.join(format!("{d}.{rest}"))).expect("mv");
                }
            }
        }
        std::fs::write(dir.join("parts"), "sda1 sda2\n").expect("parts");
    }
    let dir = cz.join("lab");
    let repo = t.s("repo");
    let o = imager_ok(&[
        "import",
        &dir.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "lab",
        "--json",
    ]);
    let r = json_result(&o);
    assert_eq!(r["images"].as_array().expect("images").len(), 2);
    assert_eq!(r["images"][0]["origin"]["tool"], "clonezilla");
    assert!(
        r["images"][0]["origin"]["files"]
            .as_array()
            .expect("files")
            .len()
            >= 2,
        "{r}"
    );
    // info names the origin.
    let info = String::from_utf8_lossy(&imager_ok(&["info", "lab-sda1", "--repo", &repo]).stdout)
        .into_owned();
    assert!(info.contains("imported:     from clonezilla"), "{info}");
    assert!(info.contains("partclone CRC32"), "{info}");
    // ext4: byte-identical with the source.
    imager_ok(&[
        "restore",
        "lab-sda1",
        "--repo",
        &repo,
        &t.s("r1.img"),
        "--records",
        &t.s("rec"),
    ]);
    assert_same(&ext4, &t.p("r1.img"));
    // NTFS: byte-identical with partclone's own restore of the same parts.
    imager_ok(&[
        "restore",
        "lab-sda2",
        "--repo",
        &repo,
        &t.s("r2.img"),
        "--records",
        &t.s("rec"),
    ]);
    partclone_restore(
        &format!("cat {}/sda2.ntfs-ptcl-img.gz.* | gzip -dc", dir.display()),
        64 * MIB,
        &t.p("pc2.img"),
    );
    assert_same(&t.p("pc2.img"), &t.p("r2.img"));
    // Delta works on the imported image: a second restore fetches nothing.
    let o = imager_ok(&[
        "restore",
        "lab-sda1",
        "--repo",
        &repo,
        &t.s("r1.img"),
        "--scan",
        "--json",
        "--records",
        &t.s("rec"),
    ]);
    let st = &json_result(&o)["stats"];
    assert_eq!(st["bytes_fetched"], 0, "{st}");
    // Dedupe: importing the same directory again stores no new chunk.
    let before = chunk_files(&t.p("repo"));
    imager_ok(&[
        "import",
        &dir.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "again",
    ]);
    assert_eq!(chunk_files(&t.p("repo")), before);
    // restore takes the split parts directly, and standard input.
    let first = dir.join("sda1.ext4-ptcl-img.gz.aa");
    imager_ok(&["restore", &first.display().to_string(), &t.s("d1.img")]);
    assert_same(&ext4, &t.p("d1.img"));
    sh(&format!(
        "cat {}/sda1.ext4-ptcl-img.gz.* | {} restore - {}",
        dir.display(),
        bin(),
        t.s("d2.img")
    ));
    assert_same(&ext4, &t.p("d2.img"));

    // A flipped byte in the second part: refused naming that part, nothing
    // published.
    let bad = t.p("bad");
    sh(&format!("cp -r {} {}", dir.display(), bad.display()));
    let ab = bad.join("sda1.ext4-ptcl-img.gz.ab");
    let len = std::fs::metadata(&ab).expect("ab").len();
    let mut b = std::fs::read(&ab).expect("read");
    b[(len / 2) as usize] ^= 0x5A;
    std::fs::write(&ab, b).expect("write");
    let names_before = image_names(&repo);
    let o = imager(&[
        "import",
        &bad.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "bad",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("sda1.ext4-ptcl-img.gz.a"),
        "{}",
        stderr(&o)
    );
    assert_eq!(image_names(&repo), names_before);
    // The same corruption through restore: refused, naming the part.
    let o = imager(&[
        "restore",
        &bad.join("sda1.ext4-ptcl-img.gz.aa").display().to_string(),
        &t.s("x.img"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("sda1.ext4-ptcl-img.gz.a"),
        "{}",
        stderr(&o)
    );
    // A missing .ab: the gap is named.
    std::fs::remove_file(&ab).expect("rm");
    let o = imager(&[
        "import",
        &bad.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "bad",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("sda1.ext4-ptcl-img.gz.ab is missing"),
        "{}",
        stderr(&o)
    );
    // A missing last part: the stream ends early in the last file present.
    let last = sh_out(&format!(
        "ls {}/sda1.ext4-ptcl-img.gz.* | tail -1",
        dir.display()
    ));
    let short = t.p("short");
    sh(&format!(
        "cp -r {} {} && rm {}/{}",
        dir.display(),
        short.display(),
        short.display(),
        Path::new(last.trim())
            .file_name()
            .expect("name")
            .to_string_lossy()
    ));
    let o = imager(&[
        "import",
        &short.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "short",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!(
            "is the next split part {}",
            short
                .join(Path::new(last.trim()).file_name().expect("name"))
                .display()
        )),
        "{}",
        stderr(&o)
    );
    assert_eq!(image_names(&repo), names_before);
    // create refuses the directory and a part file.
    let o = imager(&[
        "create",
        &dir.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "raw",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("aula-imager import"), "{}", stderr(&o));
}

/// An OpenGnsys image: `partclone.extfs | lzop` with `.img.sum` (MD5 of
/// the last MiB) and `.img.full.sum` (MD5 of the file).
fn opengnsys_image(t: &Tmp, fs: &Path, dir: &Path, name: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let img = dir.join(format!("{name}.img"));
    sh(&format!(
        "partclone.extfs -c -I -C -s {} -o - -L {} 2>/dev/null | lzop -1 -c > {}",
        fs.display(),
        t.s("pc.log"),
        img.display()
    ));
    sh(&format!(
        "md5sum < {0} | cut -d' ' -f1 > {0}.full.sum",
        img.display()
    ));
    sh(&format!(
        "tail -c1M {0} | md5sum | cut -d' ' -f1 > {0}.sum",
        img.display()
    ));
    img
}

#[test]
fn opengnsys_lzop_image_with_sums_imports_identical_and_a_wrong_sum_publishes_nothing() {
    let t = Tmp::new();
    let tree = t.p("tree");
    make_tree(&tree, 21, 8);
    let fs = t.p("fs.img");
    mkfs_ext4(&fs, 0, 48 * MIB, Some(&tree));
    let img = opengnsys_image(&t, &fs, &t.p("images"), "win");
    let repo = t.s("repo");
    let o = imager_ok(&[
        "import",
        &img.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "win",
        "--json",
    ]);
    let r = json_result(&o);
    let origin = &r["images"][0]["origin"];
    assert_eq!(origin["tool"], "opengnsys");
    let verified = origin["verified"].to_string();
    assert!(
        verified.contains(".img.full.sum") && verified.contains(".img.sum"),
        "{verified}"
    );
    assert!(origin["format"].as_str().expect("format").contains("lzop"));
    imager_ok(&[
        "restore",
        "win",
        "--repo",
        &repo,
        &t.s("out.img"),
        "--records",
        &t.s("rec"),
    ]);
    assert_same(&fs, &t.p("out.img"));
    // The same stream from standard input: same chunks, origin says so.
    sh(&format!(
        "lzop -dc < {} | {} import - --repo {repo} --name piped -q",
        img.display(),
        bin()
    ));
    let piped = manifest(Path::new(&repo), "piped");
    assert_eq!(
        piped.origin.as_ref().expect("origin").source,
        "standard input"
    );
    assert_eq!(piped.chunks, manifest(Path::new(&repo), "win").chunks);
    imager_ok(&["delete", "piped", "--repo", &repo]);
    // A full sum that does not match: refused, nothing published.
    let full = format!("{}.full.sum", img.display());
    std::fs::write(&full, "0123456789abcdef0123456789abcdef\n").expect("w");
    let o = imager(&[
        "import",
        &img.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "win2",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("win.img.full.sum"), "{}", stderr(&o));
    assert_eq!(image_names(&repo), vec!["win".to_string()]);
    // A wrong tail sum too (checked before reading the stream).
    std::fs::remove_file(&full).expect("rm");
    std::fs::write(
        format!("{}.sum", img.display()),
        "ffffffffffffffffffffffffffffffff",
    )
    .expect("w");
    let o = imager(&[
        "import",
        &img.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "win2",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("win.img.sum"), "{}", stderr(&o));
    assert_eq!(image_names(&repo), vec!["win".to_string()]);
    // create refuses the .img and points at import.
    let o = imager(&[
        "create",
        &img.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "raw",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("aula-imager import"), "{}", stderr(&o));
    assert_eq!(image_names(&repo), vec!["win".to_string()]);
}

/// Clonezilla's other part compressions: the same partclone stream squeezed
/// by xz (two streams back to back, as parallel xz writes), lz4 and bzip2
/// (two streams, as pbzip2 writes) imports to the very same chunks as the
/// plain stream and restores identical; `restore` takes the file directly;
/// a flipped byte inside the xz stream is refused and publishes nothing.
#[test]
fn xz_lz4_and_bzip2_partclone_streams_import_to_the_plain_streams_chunks_and_corruption_publishes_nothing(
) {
    require_root();
    let t = Tmp::new();
    let tree = t.p("tree");
    make_tree(&tree, 33, 6);
    let fs = t.p("fs.img");
    mkfs_ext4(&fs, 0, 40 * MIB, Some(&tree));
    let plain = t.p("sda1.ext4-ptcl-img");
    sh(&format!(
        "partclone.extfs -c -s {} -o {} -L {} >/dev/null 2>&1",
        fs.display(),
        plain.display(),
        t.s("pc.log")
    ));
    let repo = t.s("repo");
    imager_ok(&[
        "import",
        &plain.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "plain",
        "-q",
    ]);
    let want = manifest(Path::new(&repo), "plain").chunks;
    let half = std::fs::metadata(&plain).expect("stat").len() / 2;
    let p = plain.display();
    let cases = [
        (
            "xz",
            format!(
                "(head -c {half} {p} | xz -1 -c; tail -c +{} {p} | xz -1 -c)",
                half + 1
            ),
        ),
        ("lz4", format!("lz4 -1 -c {p}")),
        (
            "bz2",
            format!(
                "(head -c {half} {p} | bzip2 -1 -c; tail -c +{} {p} | bzip2 -1 -c)",
                half + 1
            ),
        ),
    ];
    for (ext, cmd) in &cases {
        let file = t.p(&format!("sda1.ext4-ptcl-img.{ext}"));
        sh(&format!("{cmd} > {}", file.display()));
        let name = format!("in-{ext}");
        imager_ok(&[
            "import",
            &file.display().to_string(),
            "--repo",
            &repo,
            "--name",
            &name,
            "-q",
        ]);
        assert_eq!(
            manifest(Path::new(&repo), &name).chunks,
            want,
            "{ext}: same chunks as the plain stream"
        );
        let out = t.p(&format!("out-{ext}.img"));
        imager_ok(&[
            "restore",
            &name,
            "--repo",
            &repo,
            &out.display().to_string(),
            "--records",
            &t.s("rec"),
        ]);
        assert_same(&fs, &out);
        let direct = t.p(&format!("direct-{ext}.img"));
        imager_ok(&[
            "restore",
            &file.display().to_string(),
            &direct.display().to_string(),
            "--records",
            &t.s("rec"),
        ]);
        assert_same(&fs, &direct);
    }
    // A flipped byte in the middle of the xz file: refused, nothing new.
    let xz = t.p("sda1.ext4-ptcl-img.xz");
    let mut bytes = std::fs::read(&xz).expect("read");
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x55;
    let bad = t.p("bad.ext4-ptcl-img.xz");
    std::fs::write(&bad, &bytes).expect("write");
    let before = image_names(&repo);
    let o = imager(&[
        "import",
        &bad.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "bad",
    ]);
    assert_ne!(o.status.code(), Some(0), "a corrupt xz stream was imported");
    assert!(
        stderr(&o).contains("xz") || stderr(&o).contains("bad.ext4"),
        "{}",
        stderr(&o)
    );
    assert_eq!(image_names(&repo), before, "nothing published");
}

/// A FOG image directory of an MBR disk: p1 ext4 (partclone -a0 | zstd,
/// split as `split -d` names it), p2 NTFS (pigz), `d1.partitions` from
/// `sfdisk -d`, `d1.mbr` the boot code and the gap before p1.
fn fog_dir(t: &Tmp, dir: &Path) -> (std::path::PathBuf, u64, u64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let disk = t.p("disk.img");
    let (p1, s1, p2, s2) = (MIB, 72 * MIB, 73 * MIB, 40 * MIB);
    sh(&format!("truncate -s {} {}", 120 * MIB, disk.display()));
    sh(&format!(
        "printf 'label: dos\\nlabel-id: 0x1badcafe\\n2048,{},83,*\\n{},{},7\\n' | sfdisk -q {}",
        s1 / 512,
        p2 / 512,
        s2 / 512,
        disk.display()
    ));
    // Boot code and a "GRUB core" in the gap after the MBR.
    let code = pseudo_random(77, 440);
    let gap = pseudo_random(78, (MIB - 512) as usize);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open");
        f.write_all_at(&code, 0).expect("code");
        f.write_all_at(&gap, 512).expect("gap");
    }
    let tree = t.p("ftree");
    make_tree(&tree, 33, 10);
    mkfs_ext4(&disk, p1, s1, Some(&tree));
    let nt = t.p("fog-ntfs.img");
    let small = t.p("fsmall");
    make_tree(&small, 34, 3);
    make_ntfs(&nt, s2, &small);
    sh(&format!(
        "dd if={} of={} bs=1M seek={} conv=notrunc status=none",
        nt.display(),
        disk.display(),
        p2 / MIB
    ));
    // FOG captures each partition device; here the partitions are byte
    // ranges of the disk file, read through loop devices with an offset
    // (the host kernel has no partition devices).
    let part = |off: u64, size: u64, out: &Path| {
        sh(&format!(
            "dd if={} of={} bs=1M skip={} count={} status=none",
            disk.display(),
            out.display(),
            off / MIB,
            size / MIB
        ))
    };
    part(p1, s1, &t.p("p1.raw"));
    part(p2, s2, &t.p("p2.raw"));
    sh(&format!(
        "partclone.extfs -c -s {} -O /dev/stdout -a0 -L /dev/null 2>/dev/null | zstd -q -3 -c | split -a 3 -d -b 2m - {}/d1p1.img.",
        t.s("p1.raw"),
        dir.display()
    ));
    sh(&format!(
        "partclone.ntfs -c -s {} -O /dev/stdout -a0 -L /dev/null 2>/dev/null | pigz -6 -c > {}/d1p2.img",
        t.s("p2.raw"),
        dir.display()
    ));
    sh(&format!(
        "sfdisk -d {} > {}/d1.partitions",
        disk.display(),
        dir.display()
    ));
    sh(&format!(
        "dd if={} of={}/d1.mbr bs=512 count=2048 status=none",
        disk.display(),
        dir.display()
    ));
    std::fs::write(dir.join("d1.fixed_size_partitions"), "").expect("w");
    (disk, p2, s2)
}

#[test]
fn fog_directory_imports_as_a_disk_image_with_its_boot_areas_and_restores_identical() {
    let t = Tmp::new();
    let dir = t.p("images/lab-fog");
    let (disk, p2, s2) = fog_dir(&t, &dir);
    assert!(
        dir.join("d1p1.img.001").exists(),
        "the zstd stream was not split"
    );
    let repo = t.s("repo");
    let o = imager_ok(&[
        "import",
        &dir.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "fog",
        "--json",
    ]);
    let r = json_result(&o);
    assert_eq!(r["images"][0]["kind"], "disk");
    assert_eq!(r["images"][0]["origin"]["tool"], "fog");
    let m = manifest(Path::new(&repo), "fog");
    assert_eq!(m.partitions.len(), 2);
    assert_eq!(m.partitions[1].start, p2);
    imager_ok(&[
        "restore",
        "fog",
        "--repo",
        &repo,
        &t.s("out.img"),
        "--records",
        &t.s("rec"),
    ]);
    // Everything before p2's last sector is identical (boot code, table,
    // gap, ext4); NTFS equals partclone's own restore of the stream.
    let n = p2 + s2 - 512;
    let head = |p: &Path| sh_out(&format!("head -c {n} {} | sha256sum", p.display()));
    assert_eq!(head(&disk), head(&t.p("out.img")));
    partclone_restore(
        &format!("gzip -dc < {}/d1p2.img", dir.display()),
        s2,
        &t.p("pc2.img"),
    );
    sh(&format!(
        "dd if={} of={} bs=1M skip={} count={} status=none",
        t.s("out.img"),
        t.s("o2.img"),
        p2 / MIB,
        s2 / MIB
    ));
    assert_same(&t.p("pc2.img"), &t.p("o2.img"));
    // The restored table is the FOG dump's.
    let dump = |p: &Path| {
        sh_out(&format!("sfdisk -d {}", p.display()))
            .lines()
            .filter(|l| !l.starts_with("device:") && !l.starts_with("/"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(dump(&disk), dump(&t.p("out.img")));
}

#[test]
fn import_all_walks_a_store_reports_each_image_and_resumes_by_skipping_imported_ones() {
    let t = Tmp::new();
    let store = t.p("store");
    let tree = t.p("tree");
    make_tree(&tree, 41, 3);
    let fs = t.p("fs.img");
    mkfs_ext4(&fs, 0, 24 * MIB, Some(&tree));
    opengnsys_image(&t, &fs, &store, "aula1");
    // A per-unit sub-directory, as OpenGnsys keeps them.
    opengnsys_image(&t, &fs, &store.join("unit2"), "lab");
    fog_dir(&t, &store.join("fogimg"));
    // A corrupt image among them.
    let bad = opengnsys_image(&t, &fs, &store, "broken");
    let len = std::fs::metadata(&bad).expect("m").len();
    let mut b = std::fs::read(&bad).expect("r");
    b.truncate((len / 2) as usize);
    std::fs::write(&bad, b).expect("w");
    std::fs::remove_file(format!("{}.full.sum", bad.display())).expect("rm");
    std::fs::remove_file(format!("{}.sum", bad.display())).expect("rm");
    let repo = t.s("repo");
    let run = || {
        let o = imager(&[
            "import",
            "--all",
            &store.display().to_string(),
            "--repo",
            &repo,
            "--json",
        ]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "the broken image must fail the run: {}",
            stderr(&o)
        );
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let mut per: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "image")
            .map(|v| {
                (
                    v["image"]["name"].as_str().expect("name").to_string(),
                    v["image"]["outcome"].as_str().expect("outcome").to_string(),
                )
            })
            .collect();
        per.sort();
        per
    };
    let first = run();
    assert_eq!(
        first,
        vec![
            ("aula1".into(), "imported".into()),
            ("broken".into(), "failed".into()),
            ("fogimg".into(), "imported".into()),
            ("unit2-lab".into(), "imported".into()),
        ]
    );
    let mut names = image_names(&repo);
    names.sort();
    assert_eq!(names, vec!["aula1", "fogimg", "unit2-lab"]);
    let second = run();
    assert_eq!(
        second,
        vec![
            ("aula1".into(), "skipped".into()),
            ("broken".into(), "failed".into()),
            ("fogimg".into(), "skipped".into()),
            ("unit2-lab".into(), "skipped".into()),
        ]
    );
    imager_ok(&[
        "restore",
        "unit2-lab",
        "--repo",
        &repo,
        &t.s("o.img"),
        "--records",
        &t.s("rec"),
    ]);
    assert_same(&fs, &t.p("o.img"));
}

/// A loop device whose partitions the kernel sees: `partx -a` adds them
/// with BLKPG (the host kernel parses no partition tables itself, but
/// takes partitions it is told about).
struct PartLoop(Loop);
impl PartLoop {
    fn new(file: &Path) -> PartLoop {
        let l = Loop(
            sh_out(&format!("losetup -P -f --show {}", file.display()))
                .trim()
                .to_string(),
        );
        sh(&format!("partx -a {}", l.0));
        PartLoop(l)
    }
}
impl Drop for PartLoop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("partx")
            .args(["-d", &self.0 .0])
            .status();
    }
}

#[test]
fn clonezilla_savedisk_of_a_gpt_disk_imports_as_a_disk_image_and_restores_identical() {
    require_root();
    let t = Tmp::new();
    let disk = t.p("disk.img");
    let size = 160 * MIB;
    sh(&format!("truncate -s {size} {}", disk.display()));
    sh(&format!(
        "printf 'label: gpt\\nlabel-id: 3B8A9D7E-2C1F-4E5A-9B6C-0D1E2F3A4B5C\\nstart=2048, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"\\nstart={}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=\"data\"\\n' | sfdisk -q {}",
        90 * MIB / 512,
        91 * MIB / 512,
        disk.display()
    ));
    // Boot code in the protective MBR.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open");
        f.write_all_at(&pseudo_random(91, 440), 0).expect("code");
    }
    let tree = t.p("tree");
    make_tree(&tree, 61, 12);
    let small = t.p("small");
    make_tree(&small, 62, 3);
    let cz = t.p("partimag");
    std::fs::create_dir_all(&cz).expect("mkdir");
    let dev;
    {
        let l = PartLoop::new(&disk);
        dev = l.0.name().to_string();
        sh(&format!(
            "mkfs.ext4 -q -F -d {} {}p1",
            tree.display(),
            l.0 .0
        ));
        sh(&format!(
            "mkntfs -q -f -L data {}p2 >/dev/null 2>&1",
            l.0 .0
        ));
        let mnt = t.p("mnt");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        sh(&format!("ntfs-3g {}p2 {}", l.0 .0, mnt.display()));
        let cp = std::process::Command::new("cp")
            .args([
                "-r",
                &format!("{}/.", small.display()),
                &mnt.display().to_string(),
            ])
            .status();
        sh(&format!("umount {}", mnt.display()));
        assert!(cp.expect("cp").success());
        sh(&format!(
            "ocs-sr -batch -or {} -q2 -z9p -i 64 -sfsck -scs -senc -p true savedisk lab {dev} > {} 2>&1 || (tail -30 {}; false)",
            cz.display(),
            t.s("ocs.log"),
            t.s("ocs.log")
        ));
    }
    let dir = cz.join("lab");
    for f in ["disk", "parts"] {
        assert!(dir.join(f).is_file(), "ocs-sr wrote no `{f}`");
    }
    assert!(
        dir.join(format!("{dev}-gpt-1st")).is_file(),
        "no primary GPT saved"
    );
    assert!(
        dir.join(format!("{dev}-gpt-2nd")).is_file(),
        "no backup GPT saved"
    );
    let repo = t.s("repo");
    let o = imager_ok(&[
        "import",
        &dir.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "lab",
        "--json",
    ]);
    let r = json_result(&o);
    assert_eq!(r["images"][0]["kind"], "disk", "{r}");
    let m = manifest(Path::new(&repo), "lab");
    let t2 = m.table.as_ref().expect("table");
    assert_eq!(t2.kind, aula_imager::table::TableKind::Gpt);
    assert_eq!(m.partitions.len(), 2);
    assert_eq!(m.source_size, size);
    let origin = m.origin.as_ref().expect("origin");
    assert_eq!(origin.tool, "clonezilla");
    assert!(origin.files.iter().any(|f| f.ends_with("-gpt-2nd")));
    imager_ok(&[
        "restore",
        "lab",
        "--repo",
        &repo,
        &t.s("out.img"),
        "--records",
        &t.s("rec"),
    ]);
    // Table areas and the ext4 partition: identical with the source disk.
    let range = |p: &Path, off: u64, len: u64| {
        sh_out(&format!(
            "tail -c +{} {} | head -c {len} | sha256sum",
            off + 1,
            p.display()
        ))
    };
    let out = t.p("out.img");
    assert_eq!(
        range(&disk, 0, 91 * MIB),
        range(&out, 0, 91 * MIB),
        "head, GPT or ext4 differ"
    );
    assert_eq!(
        range(&disk, size - 33 * 512, 33 * 512),
        range(&out, size - 33 * 512, 33 * 512),
        "backup GPT differs"
    );
    // NTFS: identical with partclone's own restore of the saved stream.
    let p2 = t.p("p2.img");
    let p2_len = size - 91 * MIB - 34 * 512;
    partclone_restore(
        &format!(
            "cat {}/{dev}p2.ntfs-ptcl-img.zst.* | zstd -dc",
            dir.display()
        ),
        p2_len,
        &p2,
    );
    assert_eq!(
        range(&p2, 0, p2_len),
        range(&out, 91 * MIB, p2_len),
        "NTFS differs from partclone's restore"
    );
    // restore refuses a whole-disk directory and points at import.
    let o = imager(&["restore", &dir.display().to_string(), &t.s("x.img")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("import"), "{}", stderr(&o));
}

#[test]
fn fog_gpt_directory_whose_d1_mbr_is_an_sgdisk_backup_restores_both_gpt_copies() {
    let t = Tmp::new();
    let dir = t.p("images/gptfog");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let disk = t.p("disk.img");
    let size = 64 * MIB;
    sh(&format!("truncate -s {size} {}", disk.display()));
    sh(&format!(
        "printf 'label: gpt\\nstart=2048, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"\\n' | sfdisk -q {}",
        40 * MIB / 512,
        disk.display()
    ));
    let tree = t.p("tree");
    make_tree(&tree, 71, 4);
    mkfs_ext4(&disk, MIB, 40 * MIB, Some(&tree));
    sh(&format!(
        "dd if={} of={} bs=1M skip=1 count=40 status=none",
        disk.display(),
        t.s("p1.raw")
    ));
    // FOG keeps a GPT disk's table as `sgdisk -b` writes it.
    sh(&format!(
        "sgdisk -b {}/d1.mbr {} >/dev/null",
        dir.display(),
        disk.display()
    ));
    sh(&format!(
        "sfdisk -d {} > {}/d1.partitions",
        disk.display(),
        dir.display()
    ));
    sh(&format!(
        "partclone.extfs -c -s {} -O /dev/stdout -a0 -L /dev/null 2>/dev/null | zstd -q -c > {}/d1p1.img",
        t.s("p1.raw"),
        dir.display()
    ));
    let repo = t.s("repo");
    imager_ok(&[
        "import",
        &dir.display().to_string(),
        "--repo",
        &repo,
        "--name",
        "g",
    ]);
    let m = manifest(Path::new(&repo), "g");
    assert_eq!(
        m.table.as_ref().expect("table").kind,
        aula_imager::table::TableKind::Gpt
    );
    assert_eq!(m.source_size, size);
    imager_ok(&[
        "restore",
        "g",
        "--repo",
        &repo,
        &t.s("out.img"),
        "--records",
        &t.s("rec"),
    ]);
    let range = |p: &Path, off: u64, len: u64| {
        sh_out(&format!(
            "tail -c +{} {} | head -c {len} | sha256sum",
            off + 1,
            p.display()
        ))
    };
    // Primary GPT (its MBR is sgdisk's protective one), partition, backup.
    let out = t.p("out.img");
    assert_eq!(
        range(&disk, 512, 41 * MIB - 512),
        range(&out, 512, 41 * MIB - 512)
    );
    assert_eq!(
        range(&disk, size - 33 * 512, 33 * 512),
        range(&out, size - 33 * 512, 33 * 512)
    );
    sh(&format!(
        "sgdisk -v {} | grep -q 'No problems found'",
        out.display()
    ));
}
