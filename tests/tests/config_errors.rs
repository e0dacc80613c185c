//! Bad configuration stops the gateway binary at start-up with a message naming the flag and its
//! variable, and without leaking a password from a URL.

use test_support::Error;
use test_support::gateway::GatewayProcess;

/// Arguments, environment, and the field the error must name.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[tokio::test]
async fn bad_configuration_stops_start_up_naming_the_field() {
    let cases: &[Case] = &[
        (
            &["standalone", "--session", "shop-1"],
            &[],
            "--session / WA_SESSIONS",
        ),
        (
            &["standalone", "--driver", "whatsapp", "--simulate", "3"],
            &[],
            "--simulate / WA_SIMULATE",
        ),
        (
            &["standalone", "--batch-policy", "fastest"],
            &[],
            "--batch-policy / WA_BATCH_POLICY",
        ),
        (
            &["standalone"],
            &[("WA_REDIS_URL", "memcached://admin:hunter2@cache:11211")],
            "--redis-url / WA_REDIS_URL",
        ),
    ];
    for (args, env, field) in cases {
        match GatewayProcess::start(args, env).await {
            Ok(_) => panic!("{args:?} {env:?} started; it should stop naming {field}"),
            Err(Error::Exited(_, log)) => {
                assert!(log.contains(field), "{args:?}: no {field:?} in {log}");
                assert!(!log.contains("hunter2"), "a password leaked: {log}");
            }
            Err(other) => panic!("{args:?}: {other}"),
        }
    }
}
