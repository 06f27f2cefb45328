//! The fuzz targets' inputs as regression tests: every committed seed (`fuzz/corpus/<target>/`)
//! and every input a fuzz run found failing (`fuzz/regressions/<target>/`), replayed through
//! the very checks the targets run (`fuzz/src/lib.rs`, included here), so the invariants they
//! guard hold in every `cargo test`, without cargo-fuzz or a nightly compiler.
//!
//! To keep a new finding: copy the input from `fuzz/artifacts/<target>/` to
//! `fuzz/regressions/<target>/` under a name that says what it broke.

use std::path::Path;

#[path = "../fuzz/src/lib.rs"]
mod checks;

/// Replays every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`; returns how
/// many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries
            .map(|e| e.expect("a directory entry").path())
            .collect();
        files.sort();
        for file in files {
            let bytes = std::fs::read(&file).expect("a readable input");
            println!("{}", file.display());
            check(&bytes);
            count += 1;
        }
    }
    count
}

#[test]
fn decoder_inputs() {
    assert!(replay("decoder", checks::decoder) >= 5);
}

#[test]
fn handshake_inputs() {
    assert!(replay("handshake", checks::handshake) >= 3);
}

#[test]
fn query_inputs() {
    assert!(replay("query", checks::query) >= 2);
}

#[test]
fn client_message_inputs() {
    assert!(replay("client_message", checks::client_message) >= 2);
}

#[test]
fn redis_entry_inputs() {
    assert!(replay("redis_entry", checks::redis_entry) >= 3);
}

/// The seeds reach what they were written for, so they keep steering the fuzzer there: a
/// seed that silently stopped parsing would still pass the checks above.
#[test]
fn seeds_are_accepted_where_meant() {
    let seed = |target: &str, name: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus")
                .join(target)
                .join(name),
        )
        .expect("a committed seed")
    };
    let up = seed("handshake", "upgrade");
    let (req, len) = herald::ws::handshake::parse_request(&up[2..], 4096)
        .unwrap()
        .unwrap();
    assert_eq!(req.websocket_key(), Ok("dGhlIHNhbXBsZSBub25jZQ=="));
    assert!(
        len < up.len() - 2,
        "the seed carries a frame after the head"
    );

    let q = seed("query", "channels");
    let q = herald::query::parse(std::str::from_utf8(&q[1..]).unwrap(), 100);
    assert_eq!(q.channels, ["a", "b", "c"]);

    let ev = seed("redis_entry", "appwrite");
    let ev = herald::bus::redis::parse_appwrite(&ev, "console")
        .unwrap()
        .event
        .unwrap();
    assert_eq!(
        (ev.project.as_str(), &ev.channels[..]),
        ("p1", &["files".to_owned()][..])
    );
}
