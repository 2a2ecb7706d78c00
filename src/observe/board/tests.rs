use super::*;
use crate::verdict::DecidedBy;
use actix_web::http::StatusCode;
use std::net::IpAddr;
use std::time::Duration;

fn board() -> Board {
    Board::new(Fingerprinter::new(b"test:"))
}

fn verdict(rule: &Arc<str>, outcome: Outcome, key: Option<RateKey>) -> Verdict {
    let mut v = Verdict::new(rule.clone(), false);
    v.outcome = outcome;
    v.decided_by = DecidedBy::Backend;
    v.key = key;
    v.client = Some("192.0.2.9".parse().unwrap());
    v
}

fn record(board: &Board, v: &Verdict, secs: u64) {
    let exchange = Exchange {
        verdict: Some(v),
        status: StatusCode::OK,
        elapsed: Duration::ZERO,
        upstream: None,
    };
    board.record(&exchange, board.origin + Duration::from_secs(secs));
}

fn at(board: &Board, secs: u64) -> Snapshot {
    board.snapshot(board.origin + Duration::from_secs(secs))
}

fn ip(addr: &str) -> Option<RateKey> {
    Some(RateKey::ip(addr.parse().unwrap()))
}

#[test]
fn counts_land_in_their_second_and_roll_out_of_the_ring() {
    let b = board();
    let login: Arc<str> = "login".into();
    let allowed = verdict(&login, Outcome::Allowed, ip("192.0.2.1"));
    let limited = verdict(&login, Outcome::Limited, ip("192.0.2.1"));
    for _ in 0..3 {
        record(&b, &allowed, 5);
    }
    record(&b, &limited, 5);
    record(&b, &allowed, 6);

    let snap = at(&b, 7);
    let rule = &snap.rules[0];
    assert_eq!(rule.rule, "login");
    assert_eq!(rule.allowed.len(), SECONDS_SHOWN);
    // Oldest first: the last entry is second 6, the one before second 5.
    assert_eq!(rule.allowed[SECONDS_SHOWN - 1], 1);
    assert_eq!(rule.allowed[SECONDS_SHOWN - 2], 3);
    assert_eq!(rule.limited[SECONDS_SHOWN - 2], 1);
    assert_eq!(rule.allowed.iter().sum::<u64>(), 4);
    assert_eq!(snap.until, b.origin_unix + 6);

    // The current second is not shown until it is complete.
    record(&b, &allowed, 7);
    assert_eq!(at(&b, 7).rules[0].allowed.iter().sum::<u64>(), 4);

    // Second 5 is still shown at 185, gone at 186; the totals stay.
    assert_eq!(at(&b, 185).rules[0].allowed[0], 3);
    let late = at(&b, 186);
    assert_eq!(
        late.rules[0].allowed.iter().sum::<u64>(),
        2,
        "seconds 6 and 7"
    );
    assert_eq!(late.rules[0].totals.allowed, 5);
    assert_eq!(late.rules[0].totals.limited, 1);

    // A bucket reused a whole ring later starts from zero, and a stale
    // write for the second it held before is dropped.
    record(&b, &allowed, 5 + RING as u64);
    record(&b, &allowed, 5);
    let reused = at(&b, 6 + RING as u64);
    assert_eq!(reused.rules[0].allowed[SECONDS_SHOWN - 1], 1);
    assert_eq!(
        reused.rules[0].totals.allowed, 7,
        "totals count every request"
    );
}

#[test]
fn totals_follow_the_metrics_decisions() {
    let b = board();
    let r: Arc<str> = "r".into();
    let mut open = verdict(&r, Outcome::Exempt, None);
    open.decided_by = DecidedBy::FailOpen;
    for (outcome, times) in [
        (Outcome::Allowed, 2),
        (Outcome::Exempt, 1),
        (Outcome::Limited, 3),
        (Outcome::ShadowLimited, 4),
        (Outcome::Denied, 5),
        (Outcome::BadKey, 6),
        (Outcome::Undecided, 7),
    ] {
        for _ in 0..times {
            record(&b, &verdict(&r, outcome, ip("192.0.2.1")), 1);
        }
    }
    record(&b, &open, 1);
    assert_eq!(
        at(&b, 2).rules[0].totals,
        Totals {
            allowed: 2,
            limited: 3,
            shadow_limited: 4,
            allow_listed: 2,
            denied: 5,
            bad_key: 6,
            undecided: 7,
        }
    );
}

#[test]
fn rules_beyond_the_slots_share_one() {
    let b = board();
    for i in 0..MAX_RULES + 3 {
        let name: Arc<str> = format!("rule-{i}").into();
        record(&b, &verdict(&name, Outcome::Allowed, None), 1);
    }
    // Same name, another Arc (a reload): the same slot.
    record(&b, &verdict(&"rule-0".into(), Outcome::Allowed, None), 1);
    let snap = at(&b, 2);
    assert_eq!(snap.rules.len(), MAX_RULES + 1);
    assert_eq!(snap.rules[0].totals.allowed, 2);
    let overflow = snap.rules.last().unwrap();
    assert_eq!(overflow.rule, OVERFLOW_RULE);
    assert_eq!(overflow.totals.allowed, 3);
}

#[test]
fn top_clients_are_ordered_by_refusals_and_name_keys_only_by_fingerprint() {
    let b = board();
    let r: Arc<str> = "r".into();
    let api_key = RateKey::header(actix_web::http::header::HeaderValue::from_static(
        "sk_live_secret",
    ));
    for (key, times) in [
        (ip("192.0.2.1"), 2),
        (ip("192.0.2.2"), 5),
        (Some(api_key.clone()), 3),
        (Some(RateKey::global()), 1),
    ] {
        for _ in 0..times {
            record(&b, &verdict(&r, Outcome::Limited, key.clone()), 10);
        }
    }
    // Allowed requests are no refusals.
    record(&b, &verdict(&r, Outcome::Allowed, ip("192.0.2.3")), 10);

    let top = at(&b, 11).top_limited;
    let fp = String::from_utf8(api_key.stable_id(&b.fingerprints)).unwrap();
    let expected = [
        ("ip:192.0.2.2", 5),
        (fp.as_str(), 3),
        ("ip:192.0.2.1", 2),
        ("ip:192.0.2.9", 1), // a global key names the peer
    ];
    let got: Vec<(&str, u64)> = top.iter().map(|t| (t.client.as_str(), t.limited)).collect();
    assert_eq!(got, expected);
    assert!(top.iter().all(|t| t.error == 0));
    assert!(!format!("{top:?}").contains("sk_live_secret"));
}

#[test]
fn top_clients_stay_bounded_and_keep_the_heavy_hitters() {
    let b = board();
    let r: Arc<str> = "r".into();
    let heavy = verdict(&r, Outcome::Limited, ip("198.51.100.1"));
    for i in 0..10_000u32 {
        let one_off = verdict(
            &r,
            Outcome::Limited,
            Some(RateKey::ip(IpAddr::from((0x0a00_0000 + i).to_be_bytes()))),
        );
        record(&b, &one_off, 30);
        if i % 10 == 0 {
            record(&b, &heavy, 30);
        }
    }
    {
        let top = b.top.lock().unwrap();
        assert!(top.minutes.iter().all(|t| t.counted.len() <= TOP_CAPACITY));
    }
    let snap = at(&b, 31);
    assert_eq!(snap.top_limited.len(), TOP_SHOWN);
    let first = &snap.top_limited[0];
    assert_eq!(first.client, "ip:198.51.100.1");
    // Space-saving never under-counts, and the error bounds the excess.
    assert!(first.limited >= 1000, "{first:?}");
    assert!(first.limited - first.error <= 1000, "{first:?}");
    let mut sorted = snap.top_limited.clone();
    sorted.sort_by_key(|c| std::cmp::Reverse(c.limited));
    assert_eq!(sorted, snap.top_limited, "most refused first");
}

#[test]
fn top_clients_are_those_of_the_last_minutes() {
    let b = board();
    let r: Arc<str> = "r".into();
    let old = verdict(&r, Outcome::Limited, ip("192.0.2.1"));
    let new = verdict(&r, Outcome::Limited, ip("192.0.2.2"));
    record(&b, &old, 10); // minute 0
    record(&b, &old, 70); // minute 1
    record(&b, &new, 250); // minute 4
    let both = at(&b, 250).top_limited;
    assert_eq!(both[0].client, "ip:192.0.2.1");
    assert_eq!(both[0].limited, 2);
    // At minute 5 the first minute is gone; at minute 6 the second too.
    assert_eq!(at(&b, 300).top_limited[0].limited, 1);
    let later = at(&b, 360).top_limited;
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].client, "ip:192.0.2.2");
    // A table reused five minutes on starts empty.
    record(&b, &new, 10 + 300); // minute 5, the table minute 0 had
    let reused = at(&b, 320).top_limited;
    assert_eq!(reused[0].client, "ip:192.0.2.2");
    assert_eq!(reused[0].limited, 2);
}
