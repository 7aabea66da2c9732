//! `openapi.yaml` and the router describe the same API: the same (method,
//! path) pairs both ways, and every documented operation is routed by a
//! running server (answers something other than 404/405).

use std::collections::BTreeSet;

use crate::harness::{Env, Stack, TestApp};

fn spec_operations() -> BTreeSet<(String, String)> {
    let spec: serde_yaml::Value =
        serde_yaml::from_str(include_str!("../../openapi.yaml")).expect("openapi.yaml parses");
    let paths = spec["paths"].as_mapping().expect("paths");
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                ops.insert((method.to_string(), path.as_str().unwrap().to_string()));
            }
        }
    }
    ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_and_router_agree() {
    let spec = spec_operations();
    let router: BTreeSet<(String, String)> = mailroom::http::route_table().into_iter().collect();
    let missing_in_spec: Vec<_> = router.difference(&spec).collect();
    let missing_in_router: Vec<_> = spec.difference(&router).collect();
    assert!(
        missing_in_spec.is_empty() && missing_in_router.is_empty(),
        "undocumented routes: {missing_in_spec:?}; documented but not routed: {missing_in_router:?}"
    );

    let env = Env::new(Stack::Embedded).await;
    let app = TestApp::start(&env, None).await;
    let http = reqwest::Client::new();
    for (method, path) in &spec {
        let concrete = path
            .replace("{email}", "someone@example.com")
            .replace(['{', '}'], "");
        let request = http.request(
            method.to_uppercase().parse().unwrap(),
            format!("{}{concrete}", app.api.base),
        );
        let status = request.send().await.unwrap().status().as_u16();
        assert!(
            status != 404 && status != 405,
            "{method} {path} answered {status}"
        );
    }
    app.stop().await;
}
