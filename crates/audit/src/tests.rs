use super::*;

fn h(s: &str) -> Hash {
    hex::decode(s).unwrap().try_into().unwrap()
}

#[test]
fn roots_match_rfc_6962_test_vectors_and_the_recursive_definition() {
    // certificate-transparency's reference leaves and roots.
    let inputs: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ];
    let leaves: Vec<Hash> = inputs.iter().map(|b| leaf_hash(b)).collect();
    assert_eq!(empty_root(), h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    assert_eq!(
        root_of(&leaves[..1]),
        h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
    );
    assert_eq!(
        root_of(&leaves),
        h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")
    );
    // The incremental tree agrees with the definition at every size.
    let mut t = Tree::default();
    let mut all = Vec::new();
    assert_eq!(t.root(), empty_root());
    for i in 0..70u32 {
        let l = leaf_hash(&i.to_be_bytes());
        all.push(l);
        t.push(l);
        assert_eq!(t.root(), root_of(&all), "size {}", i + 1);
    }
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// `n` chained records as export lines, and the tree over them.
fn export(n: u64) -> (Vec<String>, Tree) {
    let mut t = Tree::default();
    let mut lines = Vec::new();
    for seq in 0..n {
        let line = serde_json::json!({
            "seq": seq,
            "prev_root": hex::encode(t.root()),
            "call": "search",
            "key_id": "uk-reader",
            "results": seq % 7,
        })
        .to_string();
        t.push(leaf_hash(line.as_bytes()));
        lines.push(line);
    }
    (lines, t)
}

fn check(lines: &[String], cp: &Checkpoint) -> Result<u64, Bad> {
    verify_export(lines.iter().map(String::as_str), cp, &key().verifying_key())
}

#[test]
fn an_export_verifies_against_its_checkpoint_and_each_kind_of_tampering_is_named() {
    let (lines, tree) = export(20);
    let cp = Checkpoint::sign(&key(), "sovra-audit/uk", &tree);
    assert_eq!(check(&lines, &cp), Ok(20));
    // Records appended after the checkpoint are fine.
    let (longer, _) = export(25);
    assert_eq!(check(&longer, &cp), Ok(20));
    // Edited.
    let mut edited = lines.clone();
    edited[7] = edited[7].replace("\"results\":0", "\"results\":9");
    assert_ne!(edited[7], lines[7]);
    assert_eq!(check(&edited, &cp), Err(Bad::Altered { seq: 7 }));
    // The last record edited: only the checkpoint vouches for it.
    let mut last = lines.clone();
    last[19] = last[19].replace("search", "upsert");
    assert_eq!(check(&last, &cp), Err(Bad::Altered { seq: 19 }));
    // Removed.
    let mut removed = lines.clone();
    removed.remove(5);
    assert_eq!(
        check(&removed, &cp),
        Err(Bad::Sequence {
            line: 6,
            expected: 5,
            found: 6
        })
    );
    // Reordered.
    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    assert_eq!(
        check(&swapped, &cp),
        Err(Bad::Sequence {
            line: 4,
            expected: 3,
            found: 4
        })
    );
    // Truncated.
    assert_eq!(check(&lines[..15], &cp), Err(Bad::Truncated { have: 15, want: 20 }));
    // Not a record.
    let mut junk = lines.clone();
    junk[2] = "{".into();
    assert!(matches!(check(&junk, &cp), Err(Bad::Unreadable { line: 3, .. })));
}

#[test]
fn a_checkpoint_verifies_only_under_its_key_and_unaltered() {
    let (lines, tree) = export(4);
    let cp = Checkpoint::sign(&key(), "sovra-audit/uk", &tree);
    let other = SigningKey::from_bytes(&[8u8; 32]).verifying_key();
    assert!(matches!(
        verify_export(lines.iter().map(String::as_str), &cp, &other),
        Err(Bad::Checkpoint(_))
    ));
    let mut bigger = cp.clone();
    bigger.size = 3;
    assert!(matches!(check(&lines, &bigger), Err(Bad::Checkpoint(_))));
    let empty = Checkpoint::sign(&key(), "sovra-audit/uk", &Tree::default());
    assert_eq!(check(&[], &empty), Ok(0));
}

#[test]
fn the_logs_own_lines_verify_and_hold_only_a_hash_of_the_query() {
    let mut log = Log::default();
    let query = [0.25f32, -1.5, 3.0];
    let mut lines = Vec::new();
    for i in 0..12u64 {
        lines.push(log.append(&Record {
            at_ms: 1_000 + i,
            key_id: "uk-reader".into(),
            call: "search".into(),
            purpose: "fraud-check".into(),
            collection: "people".into(),
            regions: vec!["uk".into()],
            shards: 2,
            results: i,
            query_sha256: Some(vector_sha256(&query)),
            target: None,
            status: "OK".into(),
        }));
    }
    let cp = log.checkpoint(&key(), "sovra-audit/uk");
    assert_eq!(check(&lines, &cp), Ok(12));
    assert!(lines[0].starts_with("{\"seq\":0,\"prev_root\":"), "{}", lines[0]);
    assert!(
        !lines[0].contains("0.25") && !lines[0].contains("-1.5"),
        "a vector component in the clear: {}",
        lines[0]
    );
    assert_eq!(vector_sha256(&query).len(), 64);
    // Resumed from its tree, the log goes on the same chain.
    let mut resumed = Log::resume(log.tree().clone());
    let mut more = lines.clone();
    more.push(resumed.append(&Record {
        at_ms: 2_000,
        key_id: "admin".into(),
        call: "erase".into(),
        purpose: "dsar-17".into(),
        collection: "people".into(),
        regions: vec!["uk".into()],
        shards: 2,
        results: 3,
        query_sha256: None,
        target: None,
        status: "OK".into(),
    }));
    assert_eq!(check(&more, &resumed.checkpoint(&key(), "sovra-audit/uk")), Ok(13));
}
