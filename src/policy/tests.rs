use std::num::NonZeroU32;

use super::*;
use crate::limiter::Algorithm;

fn gcra(name: &str, rate: &str) -> Limit {
    let rate: crate::Rate = rate.parse().unwrap();
    Limit::new(name, rate, rate.count())
}

fn rule(name: &str, path: &str) -> Rule {
    Rule::new(name)
        .matching(Match::any().path(path))
        .limit(gcra(name, "5/min"))
}

fn default() -> Rule {
    Rule::new(DEFAULT_RULE).limit(gcra(DEFAULT_RULE, "10/min"))
}

#[test]
fn first_match_in_order_wins_else_default() {
    let rules = Rules::new(
        vec![
            rule("login", "/login"),
            rule("api-v2", "/api/v2"),
            rule("api", "/api"),
            rule("shadowed", "/api/v2/x"),
        ],
        default(),
    )
    .unwrap();
    let pick = |path: &str| rules.select(&Method::GET, path, None).name.to_string();
    assert_eq!(pick("/login"), "login");
    assert_eq!(pick("/api/v2/x"), "api-v2", "earlier rule wins");
    assert_eq!(pick("/api/v3"), "api");
    assert_eq!(pick("/apix"), "default");
    assert_eq!(pick("/"), "default");
    assert_eq!(rules.rules().count(), 4);
    assert_eq!(&*rules.default_rule().name, "default");
}

#[test]
fn normalised_spellings_select_the_login_rule() {
    let rules = Rules::new(vec![rule("login", "/login")], default()).unwrap();
    for path in [
        "/login",
        "/%6Cogin",
        "//login",
        "/static/../login",
        "/login/",
        "/login%2Fx",
        "/x%2F..%2Flogin",
        "/x\\..\\login",
        "/login;jsessionid=1",
        "/x/..;/login",
    ] {
        assert_eq!(
            &*rules.select(&Method::POST, path, None).name,
            "login",
            "{path}"
        );
    }
    for path in ["/loginx", "/%2Flogins", "/logi"] {
        assert_eq!(
            &*rules.select(&Method::POST, path, None).name,
            "default",
            "{path}"
        );
    }
}

#[test]
fn methods_and_hosts_narrow_a_rule() {
    let post_login = Rule::new("login").matching(
        Match::any()
            .path("/login")
            .methods([Method::POST])
            .host("*.example.com".parse().unwrap()),
    );
    let rules = Rules::new(vec![post_login], default()).unwrap();
    let pick = |m: Method, host: Option<&str>| rules.select(&m, "/login", host).name.to_string();
    assert_eq!(pick(Method::POST, Some("A.Example.com:8443")), "login");
    assert_eq!(pick(Method::GET, Some("a.example.com")), "default");
    assert_eq!(pick(Method::POST, Some("example.com")), "default");
    assert_eq!(pick(Method::POST, None), "default");
}

#[test]
fn names_are_checked_all_at_once() {
    let errors = Rules::check(
        &[
            rule("ok", "/a"),
            rule("Bad Name", "/b"),
            rule("ok", "/c"),
            rule("default", "/d"),
        ],
        &Rule::new("default"),
    )
    .unwrap_err();
    assert_eq!(
        errors,
        vec![
            RulesError::BadName("Bad Name".into()),
            RulesError::DuplicateName("ok".into()),
            RulesError::ReservedName("default".into()),
        ]
    );
    assert!(Rules::new(vec![rule("", "/")], default()).is_err());
    let shared = Rule::new("b").limit(gcra("daily", "100/d"));
    let errors = Rules::check(
        &[Rule::new("a").limit(gcra("daily", "100/d")), shared],
        &default(),
    )
    .unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "limit name \"daily\" is used by rule \"a\" and rule \"b\"; limit names are unique across rules"
    );
}

#[test]
fn deny_wins_over_allow_and_global_lists_add_to_a_rules() {
    let r = Rule::new("r")
        .allow(["10.0.0.0/8".parse().unwrap()])
        .deny(["10.1.0.0/16".parse().unwrap()])
        .allow_keys([Bytes::from_static(b"office-key")]);
    let global = Lists {
        allow: vec!["192.0.2.0/24".parse().unwrap()],
        deny: vec!["203.0.113.0/24".parse().unwrap()],
        ..Lists::default()
    };
    let a = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    let none: &[HeaderValue] = &[];
    assert_eq!(r.access(a("10.2.3.4"), none, &global), Access::Allow);
    assert_eq!(r.access(a("10.1.3.4"), none, &global), Access::Deny);
    assert_eq!(r.access(a("192.0.2.9"), none, &global), Access::Allow);
    assert_eq!(r.access(a("203.0.113.9"), none, &global), Access::Deny);
    assert_eq!(
        r.access(a("::ffff:203.0.113.9"), none, &global),
        Access::Deny
    );
    assert_eq!(r.access(a("198.51.100.1"), none, &global), Access::Limit);
    assert_eq!(r.access(None, none, &global), Access::Limit);
    let office = [HeaderValue::from_static("office-key")];
    assert_eq!(r.access(a("198.51.100.1"), &office, &global), Access::Allow);
    let two = [
        HeaderValue::from_static("other"),
        HeaderValue::from_static("office-key"),
    ];
    assert_eq!(
        r.access(a("198.51.100.1"), &two, &global),
        Access::Allow,
        "any header part listed exempts a composite key"
    );
    assert_eq!(r.access(a("10.1.0.1"), &office, &global), Access::Deny);
}

#[test]
fn global_shadow_wins_over_a_rules_false() {
    let on = Lists {
        shadow: true,
        ..Lists::default()
    };
    assert!(Rule::new("r").is_shadow(&on));
    assert!(!Rule::new("r").is_shadow(&Lists::default()));
    assert!(Rule::new("r").shadow(true).is_shadow(&Lists::default()));
    let rules = Rules::single(default()).unwrap().with_global(on.clone());
    assert_eq!(rules.global(), &on);
}

#[test]
fn limits_may_count_their_own_key() {
    let window = Limit::window("web", "1000/s".parse().unwrap(), Algorithm::FixedWindow).unwrap();
    let r = Rule::new("r")
        .key("header:x-api-key+ip".parse().unwrap())
        .limit(Limit::new(
            "r.1",
            "5/s".parse().unwrap(),
            NonZeroU32::new(10).unwrap(),
        ))
        .limit_by(window, KeySpec::global());
    assert_eq!(r.limits[0].key_spec(&r).to_string(), "header:x-api-key+ip");
    assert_eq!(r.limits[1].key_spec(&r), &KeySpec::global());
    assert_eq!(r.key_specs().count(), 2);
    let rules = Rules::new(vec![r], default()).unwrap();
    let names: Vec<&str> = rules.limits().map(|(_, l)| l.limit.name()).collect();
    assert_eq!(names, ["r.1", "web", "default"]);
}
