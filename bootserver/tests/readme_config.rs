//! Every TOML snippet in README.md's "In a real lab" section is a valid
//! `aula-bootserver` configuration (`--check-config`), so the admin guide
//! cannot drift from the server's settings.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_aula-bootserver");
const README: &str = include_str!("../../README.md");

/// The ```toml blocks between `## In a real lab` and the next `## `.
fn lab_snippets() -> Vec<String> {
    let start = README
        .find("\n## In a real lab")
        .expect("README has an \"In a real lab\" section");
    let rest = &README[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    let section = &rest[..end];
    let mut out = Vec::new();
    let mut lines = section.lines();
    while let Some(l) = lines.next() {
        if l.trim() == "```toml" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            out.push(block.join("\n") + "\n");
        }
    }
    out
}

#[test]
fn every_config_snippet_of_the_lab_guide_passes_check_config() {
    let snippets = lab_snippets();
    assert!(
        snippets.len() >= 2,
        "expected the full-DHCP and proxyDHCP snippets, found {}",
        snippets.len()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, text) in snippets.iter().enumerate() {
        let p = dir.path().join(format!("snippet{i}.toml"));
        std::fs::write(&p, text).expect("write");
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&p)
            .arg("--check-config")
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "README snippet {i} is not a valid config:\n{text}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_broken_snippet_would_be_caught() {
    // The same check refuses a typo, so the test above can fail.
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("bad.toml");
    let text = lab_snippets()[0].replace("[dhcp]", "[dhcp]\nmod = \"full\"");
    std::fs::write(&p, text).expect("write");
    let st = Command::new(BIN)
        .arg("--config")
        .arg(&p)
        .arg("--check-config")
        .output()
        .expect("run");
    assert!(!st.status.success());
}
