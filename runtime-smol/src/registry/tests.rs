//! The registry's pure parts: leases, keys, URLs, answers.

use super::*;

#[test]
fn leases_are_whole_milliseconds_rounded_up() {
    assert_eq!(millis(Duration::ZERO), 1);
    assert_eq!(millis(Duration::from_micros(1500)), 2);
    assert_eq!(millis(Duration::from_secs(3)), 3000);
    assert_eq!(millis(Duration::MAX), MAX_LEASE_MS);
}

#[test]
fn every_key_has_the_one_hash_tag() {
    let prefix = "tscf:{lab}:";
    let name = DirectorName::new("dir-a").expect("a name");
    let v6: IpAddr = "fd00::1".parse().expect("an address");
    for key in [
        director_key(prefix, &name),
        tunnel_key(prefix, 0xfeed),
        address_key(prefix, &v6),
    ] {
        assert!(key.starts_with("tscf:{lab}:"), "{key}");
    }
    assert_eq!(tunnel_key(prefix, 0xfeed), "tscf:{lab}:tunnel:feed");
}

#[test]
fn sentinel_urls_name_sentinels_and_a_master() {
    for url in [
        "redis+sentinel://127.0.0.1:26379/mymaster",
        "redis+sentinel://10.0.0.1,10.0.0.2:26380,[fd00::3]/mymaster",
        "redis+sentinel://:pass%2Fword@sentinel.example:26379/store-a/2",
        "redis+sentinel://tscf:secret@[fd00::1]:26379/mymaster",
        "redis://127.0.0.1:6379/",
        "unix:///run/redis.sock",
    ] {
        assert!(Store::open(url).is_ok(), "{url}");
    }
    for (url, reason) in [
        ("redis+sentinel://127.0.0.1:26379", "no master name"),
        ("redis+sentinel://127.0.0.1:26379/", "master name \"\""),
        ("redis+sentinel://127.0.0.1/my master", "master name"),
        ("redis+sentinel://127.0.0.1/mymaster?x=1", "master name"),
        ("redis+sentinel:///mymaster", "an empty sentinel address"),
        (
            "redis+sentinel://a,,b/mymaster",
            "an empty sentinel address",
        ),
        ("redis+sentinel://a:port/mymaster", "sentinel \"a:port\""),
        ("redis+sentinel://a:26379/mymaster/x", "database \"x\""),
        ("http://nowhere", ""),
    ] {
        let Err(why) = Store::open(url) else {
            panic!("{url} was taken");
        };
        assert!(why.contains(reason), "{url}: {why}");
    }
}

#[test]
fn a_heartbeat_answer_is_sorted_and_foreign_pairs_are_left_out() {
    let flat: Vec<String> = [
        "b",
        "127.0.0.1:2",
        "NOT A NAME",
        "x",
        "a",
        "127.0.0.1:1",
        "c",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let names: Vec<String> = directors(&flat)
        .into_iter()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);
}
