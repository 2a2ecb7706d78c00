use super::*;

fn spec(s: &str) -> KeySpec {
    s.parse().unwrap()
}

fn parse(s: &str, text: &str) -> Result<ParsedKey, LimitsError> {
    ParsedKey::parse(&spec(s), text, &ClientIp::new())
}

fn fp() -> Fingerprinter {
    Fingerprinter::new(b"floodgate:")
}

#[test]
fn an_ip_key_is_an_address_grouped_as_requests_are() {
    let key = parse("ip", "2001:db8::1:2:3").unwrap();
    assert_eq!(
        key.for_spec(&spec("ip")),
        Some(RateKey::ip("2001:db8::".parse().unwrap()))
    );
    let mapped = parse("ip", "::ffff:192.0.2.1").unwrap();
    assert_eq!(
        mapped.for_spec(&spec("ip")),
        Some(RateKey::ip("192.0.2.1".parse().unwrap()))
    );
    let doc = mapped.to_json(&fp());
    assert_eq!(doc["kind"], "ip");
    assert_eq!(doc["value"], "192.0.2.1");
    assert_eq!(doc["id"], "ip:192.0.2.1");
    for bad in ["nope", "192.0.2", "", "192.0.2.1+192.0.2.2", "%zz"] {
        assert!(
            matches!(parse("ip", bad), Err(LimitsError::BadKey(_))),
            "{bad}"
        );
    }
}

#[test]
fn a_header_key_is_its_value_or_its_fingerprint_and_shows_only_the_fingerprint() {
    let fp = fp();
    let by_value = parse("header:x-api-key", "sk_live_secret").unwrap();
    let key = by_value.for_spec(&spec("header:x-api-key")).unwrap();
    assert_eq!(
        key,
        RateKey::header(HeaderValue::from_static("sk_live_secret"))
    );
    let shown = by_value.to_json(&fp).to_string();
    assert!(!shown.contains("sk_live_secret"), "{shown}");
    let fingerprint = fp.fingerprint(b"sk_live_secret").to_string();
    assert_eq!(by_value.to_json(&fp)["fingerprint"], fingerprint);
    assert_eq!(by_value.to_json(&fp)["id"], format!("h:{fingerprint}"));

    let by_fp = parse("header:x-api-key", &format!("h:{fingerprint}")).unwrap();
    let fp_key = by_fp.for_spec(&spec("header:x-api-key")).unwrap();
    assert!(fp_key.is_fingerprint_only());
    assert_eq!(fp_key.stable_id(&fp), key.stable_id(&fp));
    assert_eq!(by_fp.to_json(&fp), by_value.to_json(&fp));

    // Escapes, normalisation, and the address of a request without it.
    let raw = parse("header:x-api-key", "raw:h:abc").unwrap();
    assert_eq!(
        raw.for_spec(&spec("header:x-api-key")),
        Some(RateKey::header(HeaderValue::from_static("h:abc")))
    );
    let auth = parse("header:authorization", "BEARER%20%20tok").unwrap();
    assert_eq!(
        auth.for_spec(&spec("header:authorization")),
        Some(RateKey::header(HeaderValue::from_static("bearer tok")))
    );
    let missing = parse("header:x-api-key", "ip:192.0.2.7").unwrap();
    assert_eq!(
        missing.for_spec(&spec("header:x-api-key")),
        Some(RateKey::ip("192.0.2.7".parse().unwrap()))
    );
    for bad in ["h:1234", "ip:nope", "%20", "a%0Ab"] {
        assert!(
            matches!(parse("header:x-api-key", bad), Err(LimitsError::BadKey(_))),
            "{bad}"
        );
    }
}

#[test]
fn a_composite_key_is_its_pieces_in_order_and_feeds_limits_with_other_keys() {
    let fp = fp();
    let key = parse("header:x-api-key+ip", "a%2Bb%2Fc+192.0.2.1").unwrap();
    let whole = RateKey::composite([
        RateKey::header(HeaderValue::from_static("a+b/c")),
        RateKey::ip("192.0.2.1".parse().unwrap()),
    ]);
    assert_eq!(
        key.for_spec(&spec("header:x-api-key+ip")),
        Some(whole.clone())
    );
    assert_eq!(
        key.for_spec(&spec("ip")),
        Some(RateKey::ip("192.0.2.1".parse().unwrap()))
    );
    assert_eq!(key.for_spec(&spec("global")), Some(RateKey::global()));
    assert_eq!(key.for_spec(&spec("header:other")), None);
    let doc = key.to_json(&fp);
    assert_eq!(doc["kind"], "composite");
    assert_eq!(doc["parts"][0]["kind"], "header");
    assert_eq!(doc["parts"][1]["value"], "192.0.2.1");
    assert_eq!(
        doc["id"],
        String::from_utf8(whole.stable_id(&fp)).unwrap().as_str()
    );
    assert!(!doc.to_string().contains("a+b/c"));
    assert!(matches!(
        parse("header:x-api-key+ip", "only-one"),
        Err(LimitsError::BadKey(_))
    ));
}
