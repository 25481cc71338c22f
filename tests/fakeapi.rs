//! The fake Kubernetes API server (tests/support/fake_apiserver.rs) behaves like the real one:
//! raw HTTP checks of the REST semantics, then kube-rs (client, watcher, reflector) against it.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::time::{Duration, Instant};

use fake_apiserver::{DeleteOutcome, FakeApiServer, FaultRule, Identity, Policy, HARNESS_TOKEN};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, PersistentVolumeClaim};
use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VA: &str = "/apis/storage.k8s.io/v1/volumeattachments";

/// Generous bound for things that should take milliseconds.
const DEADLINE: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (one request per connection)
// ------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    /// The body ended without the chunked terminator (the server cut the connection).
    truncated: bool,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Watch events, one JSON object a line.
    fn events(&self) -> Vec<Value> {
        self.body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = vec![];
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (out, true);
        };
        let size_str = String::from_utf8_lossy(&raw[..eol]);
        let Ok(size) = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16) else {
            return (out, true);
        };
        raw = &raw[eol + 2..];
        if size == 0 {
            return (out, false);
        }
        if raw.len() < size {
            out.extend_from_slice(raw);
            return (out, true);
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or(&[]);
    }
}

/// A request as the harness (allowed everything).
async fn http(
    server: &FakeApiServer,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    http_as(
        server,
        Some(HARNESS_TOKEN),
        method,
        path,
        content_type,
        body,
    )
    .await
}

/// A request with bearer token `token` (None: anonymous).
async fn http_as(
    server: &FakeApiServer,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
        server.addr()
    );
    if let Some(token) = token {
        req.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = vec![];
    let mut buf = [0u8; 16384];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let rest = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let (body, truncated) = if chunked {
        dechunk(rest)
    } else {
        (rest.to_vec(), false)
    };
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        truncated,
    }
}

/// Opens a watch and returns its first `n` events as soon as they arrived (then hangs up).
async fn watch_events(server: &FakeApiServer, path: &str, n: usize) -> Vec<Value> {
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAuthorization: Bearer {HARNESS_TOKEN}\r\n\r\n",
        server.addr()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = vec![];
    let mut buf = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let (body, _) = dechunk(&raw[split + 4..]);
            let text = String::from_utf8_lossy(&body).into_owned();
            let events: Vec<Value> = text
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if events.len() >= n {
                return events[..n].to_vec();
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => panic!(
                "the watch ended before {n} events: {}",
                String::from_utf8_lossy(&raw)
            ),
            Ok(Ok(k)) => raw.extend_from_slice(&buf[..k]),
            Err(_) => panic!(
                "timed out waiting for {n} events: {}",
                String::from_utf8_lossy(&raw)
            ),
        }
    }
}

async fn get(s: &FakeApiServer, path: &str) -> Resp {
    http(s, "GET", path, None, None).await
}

async fn post(s: &FakeApiServer, path: &str, body: &Value) -> Resp {
    http(s, "POST", path, Some("application/json"), Some(body)).await
}

async fn put(s: &FakeApiServer, path: &str, body: &Value) -> Resp {
    http(s, "PUT", path, Some("application/json"), Some(body)).await
}

async fn merge(s: &FakeApiServer, path: &str, body: &Value) -> Resp {
    http(
        s,
        "PATCH",
        path,
        Some("application/merge-patch+json"),
        Some(body),
    )
    .await
}

async fn delete(s: &FakeApiServer, path: &str) -> Resp {
    http(s, "DELETE", path, None, None).await
}

fn va(name: &str) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "VolumeAttachment",
        "metadata": {"name": name},
        "spec": {
            "attacher": "rds.csi.srvlab.io",
            "nodeName": "node-b",
            "source": {"persistentVolumeName": format!("pv-{name}")},
        },
    })
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

fn rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn assert_status(r: &Resp, code: u16, reason: &str) {
    assert_eq!(r.status, code, "{}", r.body);
    let s = r.json();
    assert_eq!(s["kind"], "Status", "{s}");
    assert_eq!(s["apiVersion"], "v1", "{s}");
    assert_eq!(s["status"], "Failure", "{s}");
    assert_eq!(s["code"], code, "{s}");
    assert_eq!(s["reason"], reason, "{s}");
    assert!(s["message"].as_str().is_some_and(|m| !m.is_empty()), "{s}");
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ------------------------------------------------------------------------------------------
// Raw HTTP
// ------------------------------------------------------------------------------------------

/// The benchmarks' list cache (`cache_lists`): a list is answered again from its first answer,
/// resourceVersion included, while nothing of its type is written, so writes to another type
/// (a Lease renewed) keep it; a write of its type answers afresh. A watch from the cached
/// resourceVersion still starts (it is not compacted) and sees the type's later events.
#[tokio::test]
async fn cached_lists_stay_valid_until_their_type_is_written() {
    let s = FakeApiServer::start().await;
    s.create("volumeattachments", va("va-a")).unwrap();
    s.cache_lists(true);
    let first = get(&s, &format!("{VA}?limit=100")).await.body;
    s.create(
        "leases",
        json!({"metadata": {"name": "l", "namespace": "ns"}, "spec": {"holderIdentity": "x"}}),
    )
    .unwrap();
    let again = get(&s, &format!("{VA}?limit=100")).await.body;
    assert_eq!(
        again, first,
        "a Lease write keeps the VolumeAttachment list"
    );
    let rv: Value = serde_json::from_str(&first).unwrap();
    let rv = rv["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    s.create("volumeattachments", va("va-b")).unwrap();
    let fresh = get(&s, &format!("{VA}?limit=100")).await.json();
    assert_eq!(
        names(&fresh),
        ["va-a", "va-b"],
        "a write of its type is seen"
    );
    let watch = get(
        &s,
        &format!("{VA}?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
    )
    .await;
    assert_eq!(watch.status, 200, "{}", watch.body);
    let added: Vec<_> = watch
        .events()
        .iter()
        .filter(|e| e["type"] == "ADDED")
        .map(|e| e["object"]["metadata"]["name"].clone())
        .collect();
    assert_eq!(
        added,
        [json!("va-b")],
        "the watch from the cached version sees the later write"
    );
}

#[tokio::test]
async fn list_paginates_over_a_consistent_snapshot() {
    let s = FakeApiServer::start().await;
    for i in (0..250).rev() {
        s.create("volumeattachments", va(&format!("va-{i:03}")))
            .unwrap();
    }
    let p1 = get(&s, &format!("{VA}?limit=100")).await;
    assert_eq!(p1.status, 200);
    let p1 = p1.json();
    assert_eq!(p1["kind"], "VolumeAttachmentList");
    assert_eq!(p1["apiVersion"], "storage.k8s.io/v1");
    assert_eq!(p1["metadata"]["resourceVersion"], "250");
    assert_eq!(p1["metadata"]["remainingItemCount"], 150);
    let n1 = names(&p1);
    assert_eq!(n1.len(), 100);
    assert_eq!(n1[0], "va-000");
    assert_eq!(n1[99], "va-099");
    assert!(p1["items"][0].get("kind").is_none() && p1["items"][0].get("apiVersion").is_none());
    let token = p1["metadata"]["continue"].as_str().unwrap().to_string();

    // Changes between pages are not seen by the rest of this list.
    s.create("volumeattachments", va("va-999")).unwrap();
    s.patch(
        "volumeattachments",
        None,
        "va-150",
        json!({"metadata": {"labels": {"late": "yes"}}}),
    )
    .unwrap();
    s.delete("volumeattachments", None, "va-200").unwrap();

    let p2 = get(&s, &format!("{VA}?limit=100&continue={token}"))
        .await
        .json();
    assert_eq!(p2["metadata"]["resourceVersion"], "250");
    let n2 = names(&p2);
    assert_eq!(
        (n2.len(), n2[0].as_str(), n2[99].as_str()),
        (100, "va-100", "va-199")
    );
    assert!(
        p2["items"][50]["metadata"].get("labels").is_none(),
        "va-150 as of the snapshot"
    );
    let token2 = p2["metadata"]["continue"].as_str().unwrap().to_string();
    let p3 = get(&s, &format!("{VA}?limit=100&continue={token2}"))
        .await
        .json();
    let n3 = names(&p3);
    assert_eq!(n3.len(), 50);
    assert_eq!(n3[0], "va-200", "deleted after the snapshot, still in it");
    assert!(!n3.contains(&"va-999".to_string()));
    assert!(p3["metadata"].get("continue").is_none());
    assert!(p3["metadata"].get("remainingItemCount").is_none());

    // A fresh list sees now.
    let all = get(&s, VA).await.json();
    assert_eq!(all["metadata"]["resourceVersion"], "253");
    assert_eq!(names(&all).len(), 250);
    assert!(names(&all).contains(&"va-999".to_string()));

    // Bad continue tokens and parameters.
    assert_status(
        &get(&s, &format!("{VA}?limit=10&continue=garbage!!")).await,
        400,
        "BadRequest",
    );
    assert_status(
        &get(&s, &format!("{VA}?limit=10&continue={token}&resourceVersion=5&resourceVersionMatch=NotOlderThan")).await,
        400,
        "BadRequest",
    );
    assert_status(
        &get(&s, &format!("{VA}?resourceVersionMatch=Exact")).await,
        400,
        "BadRequest",
    );
    // An exact list at an old resourceVersion is the state then.
    let at100 = get(
        &s,
        &format!("{VA}?resourceVersion=100&resourceVersionMatch=Exact"),
    )
    .await
    .json();
    assert_eq!(names(&at100).len(), 100);
    assert_eq!(at100["metadata"]["resourceVersion"], "100");
    assert_status(
        &get(&s, &format!("{VA}?resourceVersion=9999")).await,
        504,
        "Timeout",
    );

    // Compaction expires the token.
    s.compact_history();
    assert_status(
        &get(&s, &format!("{VA}?limit=100&continue={token2}")).await,
        410,
        "Expired",
    );

    // Selectors.
    let labelled = get(&s, &format!("{VA}?labelSelector=late%3Dyes"))
        .await
        .json();
    assert_eq!(names(&labelled), vec!["va-150"]);
    let not_labelled = get(
        &s,
        &format!("{VA}?labelSelector=late!%3Dyes,!other&limit=1000"),
    )
    .await
    .json();
    assert_eq!(names(&not_labelled).len(), 249);
    let by_name = get(&s, &format!("{VA}?fieldSelector=metadata.name%3Dva-007"))
        .await
        .json();
    assert_eq!(names(&by_name), vec!["va-007"]);
    let bad_field = get(&s, &format!("{VA}?fieldSelector=spec.nodeName%3Dnode-b")).await;
    assert_status(&bad_field, 400, "BadRequest");
    assert!(bad_field.json()["message"]
        .as_str()
        .unwrap()
        .contains("field label not supported"));
    let paged_selector = get(&s, &format!("{VA}?labelSelector=!late&limit=5"))
        .await
        .json();
    assert_eq!(names(&paged_selector).len(), 5);
    assert!(paged_selector["metadata"]["continue"].is_string());
    assert!(paged_selector["metadata"]
        .get("remainingItemCount")
        .is_none());
}

#[tokio::test]
async fn get_missing_is_a_not_found_status() {
    let s = FakeApiServer::start().await;
    let r = get(&s, &format!("{VA}/nope")).await;
    assert_status(&r, 404, "NotFound");
    let st = r.json();
    assert_eq!(
        st["message"],
        "volumeattachments.storage.k8s.io \"nope\" not found"
    );
    assert_eq!(
        st["details"],
        json!({"name": "nope", "group": "storage.k8s.io", "kind": "volumeattachments"})
    );
    assert_eq!(r.header("content-type"), Some("application/json"));

    let r = get(&s, "/api/v1/namespaces/ns1/persistentvolumeclaims/claim").await;
    assert_status(&r, 404, "NotFound");
    assert_eq!(
        r.json()["details"],
        json!({"name": "claim", "group": "", "kind": "persistentvolumeclaims"})
    );
    assert_status(&get(&s, "/api/v1/pods").await, 404, "NotFound");
    assert_status(&get(&s, "/api/v1/nodes/a/b").await, 404, "NotFound");
    assert_status(
        &get(&s, "/api/v1/namespaces/ns1/events/e/status").await,
        404,
        "NotFound",
    );
    assert_status(
        &post(&s, &format!("{VA}/x"), &va("x")).await,
        405,
        "MethodNotAllowed",
    );

    let v = get(&s, "/version").await.json();
    assert_eq!(
        (
            v["major"].as_str(),
            v["minor"].as_str(),
            v["gitVersion"].as_str()
        ),
        (Some("1"), Some("34"), Some("v1.34.0"))
    );
    assert_eq!(get(&s, "/api").await.json()["versions"], json!(["v1"]));
    let groups = get(&s, "/apis").await.json();
    assert_eq!(groups["groups"].as_array().unwrap().len(), 3);
    let core = get(&s, "/api/v1").await.json();
    assert!(core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "nodes/status"));
}

/// The system fields of ObjectMeta are the server's (apiserver's `FillObjectMetaSystemFields`
/// on create, `BeforeUpdate` on update and patch): a POST's `creationTimestamp` and `uid` are
/// replaced by the server's, a set `resourceVersion` is refused with the storage layer's bare
/// 500, and a PUT or patch that changes `creationTimestamp` or `generation` is silently given
/// the stored value back. Only the harness's seeding path (`FakeApiServer::create`: state that
/// exists before the test) sets them, which is how tests get an object created minutes ago.
///
/// Catches: keeping a client-set `creationTimestamp` on create (the `given(m,
/// "creationTimestamp")` check in `Store::create` answering true for a request), likewise for
/// `uid`, dropping the resourceVersion refusal, and dropping `creationTimestamp` or
/// `generation` from the fields `commit_update` carries over from the stored object.
#[tokio::test]
async fn system_fields_are_the_servers_and_only_the_harness_seeds_them() {
    let s = FakeApiServer::start().await;
    let before = fake_apiserver::now_rfc3339();
    let mut body = va("a");
    body["metadata"]["creationTimestamp"] = json!("2020-01-02T03:04:05Z");
    body["metadata"]["uid"] = json!("11111111-2222-4333-8444-555555555555");
    body["metadata"]["generation"] = json!(7);
    let r = post(&s, VA, &body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let a = r.json();
    // Both RFC 3339 in whole seconds, UTC: they compare as strings.
    let after = fake_apiserver::now_rfc3339();
    let created = a["metadata"]["creationTimestamp"].as_str().unwrap();
    assert!(
        before.as_str() <= created && created <= after.as_str(),
        "creationTimestamp {created} is not the server's clock at the request ({before}..{after})"
    );
    let uid = a["metadata"]["uid"].as_str().unwrap();
    assert_ne!(
        uid, "11111111-2222-4333-8444-555555555555",
        "a client-set uid was kept"
    );
    assert_eq!(uid.len(), 36, "{uid}");

    let mut with_rv = va("b");
    with_rv["metadata"]["resourceVersion"] = json!("5");
    let r = post(&s, VA, &with_rv).await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "resourceVersion should not be set on objects to be created",
               "code": 500}),
        "a storage error, not an API status: no reason"
    );
    assert!(s.get("volumeattachments", None, "b").is_none());

    // An update or patch cannot move the creation time or the generation: the stored ones stay.
    let path = format!("{VA}/a");
    let mut moved = a.clone();
    moved["metadata"]["creationTimestamp"] = json!("2000-01-01T00:00:00Z");
    moved["metadata"]["generation"] = json!(99);
    moved["metadata"]["labels"] = json!({"put": "yes"});
    let r = put(&s, &path, &moved).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = r.json();
    assert_eq!(r["metadata"]["labels"], json!({"put": "yes"}));
    assert_eq!(
        r["metadata"]["creationTimestamp"],
        a["metadata"]["creationTimestamp"]
    );
    assert_eq!(r["metadata"]["generation"], a["metadata"]["generation"]);
    let r = merge(
        &s,
        &path,
        &json!({"metadata": {"creationTimestamp": "2000-01-01T00:00:00Z", "generation": 99}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = r.json();
    assert_eq!(
        r["metadata"]["creationTimestamp"],
        a["metadata"]["creationTimestamp"]
    );
    assert_eq!(r["metadata"]["generation"], a["metadata"]["generation"]);
    assert_eq!(r["metadata"]["uid"], a["metadata"]["uid"]);

    // The harness seeds what existed before the test, system fields and status included.
    let mut seeded = va("seeded");
    seeded["metadata"]["creationTimestamp"] = json!("2019-01-01T00:00:00Z");
    seeded["metadata"]["uid"] = json!("11111111-2222-4333-8444-555555555555");
    let seeded = s.create("volumeattachments", seeded).unwrap();
    assert_eq!(
        seeded["metadata"]["creationTimestamp"],
        "2019-01-01T00:00:00Z"
    );
    assert_eq!(
        seeded["metadata"]["uid"],
        "11111111-2222-4333-8444-555555555555"
    );
    assert_eq!(get(&s, &format!("{VA}/seeded")).await.json(), seeded);
}

/// Authorization by the RBAC rendered from the chart (deploy/kubernetes/rbac.yaml), before
/// anything else: the driver's identity (the controller's ServiceAccount held to the driver's
/// roles) may make the calls those roles list and gets the real server's 403 Status for any
/// other, served resource or not; a Role reaches only its namespace; the whole account holds
/// the union of its bindings (the sidecars' roles too); the node's account, bound to nothing,
/// may only discover; an anonymous request may read `/version` and nothing else; an unknown
/// token is 401; resourceNames restrict by name, a list or watch naming one by field selector.
/// Every refusal is logged with its user and kept apart from the call log.
///
/// Catches: dropping the authorization check in `handle` (the `denied` answer), a RoleBinding
/// granting outside its namespace (the namespace filter in `Policy::allows`), ignoring
/// `resourceNames` in `Rule::allows`, and ignoring an identity's role restriction.
#[tokio::test]
async fn requests_outside_the_rendered_rbac_are_forbidden() {
    let s = FakeApiServer::start().await;
    s.create("volumeattachments", va("a")).unwrap();
    s.create("nodes", json!({"metadata": {"name": "n1"}}))
        .unwrap();
    let driver = s.token_for(Identity::service_account_with_roles(
        "rds-csi",
        "rds-csi-controller",
        &["rds-csi-driver", "rds-csi-driver-leases"],
    ));
    let account = s.token_for(Identity::service_account("rds-csi", "rds-csi-controller"));
    let node = s.token_for(Identity::service_account("rds-csi", "rds-csi-node"));
    let user = "system:serviceaccount:rds-csi:rds-csi-controller";
    let leases = "/apis/coordination.k8s.io/v1/namespaces";

    // What the driver's roles allow.
    for (method, path) in [
        ("GET", format!("{VA}/a")),
        ("GET", format!("{VA}?limit=500")),
        ("GET", "/api/v1/nodes/n1".to_string()),
        (
            "GET",
            format!("{leases}/rds-csi/leases?fieldSelector=metadata.name%3Dx"),
        ),
        ("GET", "/version".to_string()),
        ("GET", "/apis".to_string()),
    ] {
        let r = http_as(&s, Some(&driver), method, &path, None, None).await;
        assert_ne!(r.status, 403, "{method} {path}: {}", r.body);
    }
    let event = json!({"metadata": {"name": "e1"}, "involvedObject": {"kind": "PersistentVolumeClaim", "namespace": "default", "name": "c"}, "reason": "R", "message": "m", "type": "Normal"});
    let r = http_as(
        &s,
        Some(&driver),
        "POST",
        "/api/v1/namespaces/default/events",
        Some("application/json"),
        Some(&event),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);

    // And what they do not: the real server's Status, naming user, verb, resource and scope.
    let r = http_as(&s, Some(&driver), "DELETE", &format!("{VA}/a"), None, None).await;
    assert_eq!(
        r.json(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("volumeattachments.storage.k8s.io \"a\" is forbidden: User \"{user}\" cannot delete resource \"volumeattachments\" in API group \"storage.k8s.io\" at the cluster scope"),
               "reason": "Forbidden",
               "details": {"name": "a", "group": "storage.k8s.io", "kind": "volumeattachments"},
               "code": 403})
    );
    assert!(
        s.get("volumeattachments", None, "a").is_some(),
        "nothing was deleted"
    );
    let denied = [
        ("PATCH", format!("{VA}/a/status"), format!("volumeattachments.storage.k8s.io \"a\" is forbidden: User \"{user}\" cannot patch resource \"volumeattachments/status\" in API group \"storage.k8s.io\" at the cluster scope")),
        // The driver's Lease Role is in rds-csi only.
        ("GET", format!("{leases}/default/leases/x"), format!("leases.coordination.k8s.io \"x\" is forbidden: User \"{user}\" cannot get resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"default\"")),
        ("PUT", format!("{leases}/rds-csi/leases/x"), format!("leases.coordination.k8s.io \"x\" is forbidden: User \"{user}\" cannot update resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"rds-csi\"")),
        // Authorization comes first: a resource the fake does not serve is 403, not 404.
        ("GET", "/api/v1/namespaces/rds-csi/secrets".to_string(), format!("secrets is forbidden: User \"{user}\" cannot list resource \"secrets\" in API group \"\" in the namespace \"rds-csi\"")),
        ("POST", "/api/v1/nodes".to_string(), format!("nodes is forbidden: User \"{user}\" cannot create resource \"nodes\" in API group \"\" at the cluster scope")),
    ];
    for (method, path, message) in &denied {
        let r = http_as(
            &s,
            Some(&driver),
            method,
            path,
            Some("application/merge-patch+json"),
            Some(&json!({})),
        )
        .await;
        assert_status(&r, 403, "Forbidden");
        assert_eq!(r.json()["message"], *message, "{method} {path}");
    }

    // The whole account holds its sidecars' roles too: the csi-attacher's status patch.
    let r = http_as(
        &s,
        Some(&account),
        "PATCH",
        &format!("{VA}/a/status"),
        Some("application/merge-patch+json"),
        Some(&json!({"status": {"attached": true}})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The node's account is bound to nothing: discovery only.
    assert_eq!(
        http_as(&s, Some(&node), "GET", "/api/v1", None, None)
            .await
            .status,
        200
    );
    let r = http_as(&s, Some(&node), "GET", "/api/v1/nodes", None, None).await;
    assert_status(&r, 403, "Forbidden");
    // Anonymous: /version, nothing else.
    assert_eq!(
        http_as(&s, None, "GET", "/version", None, None)
            .await
            .status,
        200
    );
    let r = http_as(&s, None, "GET", "/api", None, None).await;
    assert_status(&r, 403, "Forbidden");
    assert_eq!(
        r.json()["message"],
        "forbidden: User \"system:anonymous\" cannot get path \"/api\""
    );
    assert_status(
        &http_as(&s, Some("no-such-token"), "GET", "/api", None, None).await,
        401,
        "Unauthorized",
    );

    let refused: Vec<(String, String, u16)> = s
        .rbac_denials()
        .iter()
        .map(|c| (c.user.clone(), c.verb.clone(), c.status.unwrap()))
        .collect();
    assert_eq!(refused.len(), 1 + denied.len() + 2, "{refused:?}");
    assert_eq!(refused[0], (user.to_string(), "delete".to_string(), 403));
    s.clear_calls();
    assert_eq!(
        s.rbac_denials().len(),
        refused.len(),
        "kept apart from the call log"
    );

    // resourceNames: one object by name, a list or watch only when it names that object.
    s.set_policy(
        Policy::from_yaml(
            "kind: Role\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: one, namespace: rds-csi}\n\
             rules: [{apiGroups: [coordination.k8s.io], resources: [leases], resourceNames: [x], verbs: [get, list, watch]}]\n\
             ---\nkind: RoleBinding\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: one, namespace: rds-csi}\n\
             subjects: [{kind: ServiceAccount, name: rds-csi-node, namespace: rds-csi}]\n\
             roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: one}\n",
        )
        .unwrap(),
    );
    for (path, allowed) in [
        ("/rds-csi/leases/x", true),
        ("/rds-csi/leases/y", false),
        ("/rds-csi/leases?fieldSelector=metadata.name%3Dx", true),
        (
            "/rds-csi/leases?watch=1&fieldSelector=metadata.name%3Dx",
            true,
        ),
        ("/rds-csi/leases", false),
        ("/default/leases/x", false),
    ] {
        let path = format!("{leases}{path}");
        let status = if path.contains("watch=1") {
            // A watch stays open: its answer's status line is enough.
            let mut stream = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {node}\r\n\r\n");
            stream.write_all(req.as_bytes()).await.unwrap();
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await.unwrap();
            String::from_utf8_lossy(&head[9..12])
                .parse::<u16>()
                .unwrap()
        } else {
            http_as(&s, Some(&node), "GET", &path, None, None)
                .await
                .status
        };
        assert_eq!(status != 403, allowed, "{path}: {status}");
    }
}

#[tokio::test]
async fn create_sets_server_fields_and_conflicts() {
    let s = FakeApiServer::start().await;
    let r = post(&s, VA, &va("a")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let a = r.json();
    assert_eq!(a["kind"], "VolumeAttachment");
    assert_eq!(a["metadata"]["resourceVersion"], "1");
    assert_eq!(a["metadata"]["uid"].as_str().unwrap().len(), 36);
    assert!(a["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(
        a["status"],
        json!({"attached": false}),
        "the create strategy resets status"
    );
    assert_eq!(get(&s, &format!("{VA}/a")).await.json(), a);

    let dup = post(&s, VA, &va("a")).await;
    assert_status(&dup, 409, "AlreadyExists");
    assert_eq!(
        dup.json()["message"],
        "volumeattachments.storage.k8s.io \"a\" already exists"
    );

    let mut gen = va("");
    gen["metadata"] = json!({"generateName": "csi-"});
    let g = post(&s, VA, &gen).await.json();
    let name = g["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("csi-") && name.len() == 9, "{name}");
    let mut noname = va("");
    noname["metadata"] = json!({});
    assert_status(&post(&s, VA, &noname).await, 422, "Invalid");

    let helper = s
        .create("volumeattachments", {
            let mut v = va("older");
            v["metadata"]["creationTimestamp"] = json!("2019-01-01T00:00:00Z");
            v["status"] = json!({"attached": true});
            v
        })
        .unwrap();
    assert_eq!(
        helper["metadata"]["creationTimestamp"],
        "2019-01-01T00:00:00Z"
    );
    assert_eq!(
        helper["status"]["attached"], true,
        "the helper keeps status"
    );

    let mut wrong_kind = va("w");
    wrong_kind["kind"] = json!("PersistentVolume");
    assert_status(&post(&s, VA, &wrong_kind).await, 400, "BadRequest");

    // Namespaced: the namespace comes from the path.
    let pvc = json!({"metadata": {"name": "claim"}, "spec": {"accessModes": ["ReadWriteOnce"]}});
    let c = post(&s, "/api/v1/namespaces/ns1/persistentvolumeclaims", &pvc).await;
    assert_eq!(c.status, 201, "{}", c.body);
    let c = c.json();
    assert_eq!(c["metadata"]["namespace"], "ns1");
    assert_eq!(c["apiVersion"], "v1");
    assert_eq!(c["status"]["phase"], "Pending");
    let mut other_ns = pvc.clone();
    other_ns["metadata"]["namespace"] = json!("ns2");
    assert_status(
        &post(
            &s,
            "/api/v1/namespaces/ns1/persistentvolumeclaims",
            &other_ns,
        )
        .await,
        400,
        "BadRequest",
    );
    assert_eq!(
        post(&s, "/api/v1/namespaces/ns2/persistentvolumeclaims", &pvc)
            .await
            .status,
        201
    );
    assert_eq!(
        names(&get(&s, "/api/v1/persistentvolumeclaims").await.json()).len(),
        2
    );
    assert_eq!(
        names(
            &get(&s, "/api/v1/namespaces/ns2/persistentvolumeclaims")
                .await
                .json()
        )
        .len(),
        1
    );

    // Events, both groups, and the cluster-wide core list. An old-style event (no eventTime)
    // about a cluster-scoped object lives in `default`; one about a namespaced object lives in
    // that object's namespace. Anything else is 422, as the real server answers.
    let ev = json!({"metadata": {"name": "e1"}, "involvedObject": {"kind": "Node", "name": "n1"}, "reason": "Attached", "type": "Normal"});
    assert_eq!(
        post(&s, "/api/v1/namespaces/default/events", &ev)
            .await
            .status,
        201
    );
    let r = post(&s, "/api/v1/namespaces/kube-system/events", &ev).await;
    assert_status(&r, 422, "Invalid");
    assert_eq!(
        r.json()["message"],
        "Event \"e1\" is invalid: involvedObject.namespace: Invalid value: \"\": does not match event.namespace"
    );
    let about_pvc = json!({"metadata": {"name": "e3"}, "involvedObject": {"kind": "PersistentVolumeClaim", "name": "disk", "namespace": "ns1"}, "reason": "Attached", "type": "Normal"});
    let r = post(&s, "/api/v1/namespaces/default/events", &about_pvc).await;
    assert_status(&r, 422, "Invalid");
    assert!(r.json()["message"].as_str().unwrap().contains(
        "involvedObject.namespace: Invalid value: \"ns1\": does not match event.namespace"
    ));
    assert_eq!(
        post(&s, "/api/v1/namespaces/ns1/events", &about_pvc)
            .await
            .status,
        201
    );
    // An update may not move it either.
    let moved = merge(
        &s,
        "/api/v1/namespaces/ns1/events/e3",
        &json!({"involvedObject": {"namespace": "ns2"}}),
    )
    .await;
    assert_status(&moved, 422, "Invalid");
    assert!(s.create("events", json!({"metadata": {"name": "e4", "namespace": "ns2"}, "involvedObject": {"kind": "Pod", "name": "p", "namespace": "ns1"}})).is_err(), "the helper validates too");
    // With eventTime (a new-style event) a cluster-scoped object's event may be in kube-system.
    let mut new_style = ev.clone();
    new_style["eventTime"] = json!("2024-01-01T00:00:00.000000Z");
    assert_eq!(
        post(&s, "/api/v1/namespaces/kube-system/events", &new_style)
            .await
            .status,
        201
    );
    assert_status(
        &post(&s, "/api/v1/namespaces/ns2/events", &new_style).await,
        422,
        "Invalid",
    );
    let evs = get(&s, "/api/v1/events").await.json();
    assert_eq!(evs["kind"], "EventList");
    assert_eq!(names(&evs).len(), 3);
    let by_obj = get(
        &s,
        "/api/v1/events?fieldSelector=involvedObject.name%3Dn1,reason%3DAttached",
    )
    .await
    .json();
    assert_eq!(names(&by_obj).len(), 2);
    let ev2 = json!({"metadata": {"name": "e2"}, "eventTime": "2024-01-01T00:00:00.000000Z", "reason": "R", "action": "A", "reportingController": "c", "reportingInstance": "i"});
    let e2 = post(&s, "/apis/events.k8s.io/v1/namespaces/default/events", &ev2)
        .await
        .json();
    assert_eq!(e2["apiVersion"], "events.k8s.io/v1");
    assert_eq!(
        names(
            &get(&s, "/apis/events.k8s.io/v1/namespaces/default/events")
                .await
                .json()
        ),
        vec!["e2"]
    );
    assert_eq!(
        names(&get(&s, "/api/v1/namespaces/default/events").await.json()),
        vec!["e1"]
    );
}

#[tokio::test]
async fn update_and_patch_semantics() {
    let s = FakeApiServer::start().await;
    let a = post(&s, VA, &va("a")).await.json();
    let path = format!("{VA}/a");

    // PUT with a stale resourceVersion: 409.
    let mut stale = a.clone();
    stale["metadata"]["resourceVersion"] = json!("999");
    stale["metadata"]["labels"] = json!({"x": "1"});
    let r = put(&s, &path, &stale).await;
    assert_status(&r, 409, "Conflict");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("the object has been modified"));

    // PUT with the current one: a new resourceVersion.
    let mut cur = a.clone();
    cur["metadata"]["labels"] = json!({"x": "1"});
    cur["status"] = json!({"attached": true});
    let u = put(&s, &path, &cur).await;
    assert_eq!(u.status, 200, "{}", u.body);
    let u = u.json();
    assert_eq!(rv(&u), rv(&a) + 1);
    assert_eq!(u["metadata"]["labels"]["x"], "1");
    assert_eq!(
        u["status"]["attached"], false,
        "status only through /status"
    );
    assert_eq!(u["metadata"]["uid"], a["metadata"]["uid"]);
    // Without a resourceVersion: unconditional.
    let mut uncond = u.clone();
    uncond["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    uncond["metadata"]["labels"]["y"] = json!("2");
    assert_eq!(put(&s, &path, &uncond).await.status, 200);
    // Wrong name in the body.
    let mut renamed = u.clone();
    renamed["metadata"]["name"] = json!("b");
    renamed["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    assert_status(&put(&s, &path, &renamed).await, 400, "BadRequest");
    assert_status(
        &put(&s, &format!("{VA}/missing"), &va("missing")).await,
        404,
        "NotFound",
    );

    // Merge patch: add and remove.
    let p = merge(
        &s,
        &path,
        &json!({"metadata": {"labels": {"z": "3", "x": null}}}),
    )
    .await;
    assert_eq!(p.status, 200, "{}", p.body);
    let p = p.json();
    assert_eq!(p["metadata"]["labels"], json!({"y": "2", "z": "3"}));
    // A no-op patch writes nothing.
    let same = merge(&s, &path, &json!({"metadata": {"labels": {"z": "3"}}}))
        .await
        .json();
    assert_eq!(
        same["metadata"]["resourceVersion"],
        p["metadata"]["resourceVersion"]
    );
    // A resourceVersion in the patch is a precondition.
    let r = merge(
        &s,
        &path,
        &json!({"metadata": {"resourceVersion": "1", "labels": {"q": "1"}}}),
    )
    .await;
    assert_status(&r, 409, "Conflict");
    let ok = merge(&s, &path, &json!({"metadata": {"resourceVersion": p["metadata"]["resourceVersion"], "labels": {"q": "1"}}})).await;
    assert_eq!(ok.status, 200);
    // A strategic merge patch merges maps as a merge patch does (its lists: see
    // strategic_merge_patch_follows_the_patch_strategies).
    let smp = http(
        &s,
        "PATCH",
        &path,
        Some("application/strategic-merge-patch+json"),
        Some(&json!({"metadata": {"annotations": {"a": "b"}}})),
    )
    .await;
    assert_eq!(smp.json()["metadata"]["annotations"]["a"], "b");
    // JSON patch, with a failing test op.
    let jp = json!([{"op": "test", "path": "/metadata/labels/z", "value": "3"}, {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}]);
    let r = http(
        &s,
        "PATCH",
        &path,
        Some("application/json-patch+json"),
        Some(&jp),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["metadata"]["finalizers"], json!(["f"]));
    let bad = json!([{"op": "test", "path": "/metadata/labels/z", "value": "nope"}]);
    assert_status(
        &http(
            &s,
            "PATCH",
            &path,
            Some("application/json-patch+json"),
            Some(&bad),
        )
        .await,
        422,
        "Invalid",
    );
    assert_status(
        &http(
            &s,
            "PATCH",
            &path,
            Some("application/apply-patch+yaml"),
            Some(&json!({})),
        )
        .await,
        415,
        "UnsupportedMediaType",
    );
    assert_status(
        &merge(&s, &format!("{VA}/missing"), &json!({})).await,
        404,
        "NotFound",
    );
    // The creation time cannot be patched away: the server keeps its own.
    let r = merge(
        &s,
        &path,
        &json!({"metadata": {"creationTimestamp": "2000-01-01T00:00:00Z"}}),
    )
    .await
    .json();
    assert_eq!(
        r["metadata"]["creationTimestamp"],
        a["metadata"]["creationTimestamp"]
    );

    // A uid is immutable. In a PUT body it is a precondition: 409, as the storage layer says.
    let before = s.get("volumeattachments", None, "a").unwrap();
    let mut other = before.clone();
    other["metadata"]["uid"] = json!("someone-else");
    other["metadata"]["labels"] = json!({"moved": "yes"});
    let r = put(&s, &path, &other).await;
    assert_status(&r, 409, "Conflict");
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.starts_with(
            "Operation cannot be fulfilled on volumeattachments.storage.k8s.io \"a\": StorageError: invalid object, Code: 4, Key: /registry/volumeattachments/a"
        ) && message.ends_with(&format!(
            "Precondition failed: UID in precondition: someone-else, UID in object meta: {}",
            a["metadata"]["uid"].as_str().unwrap()
        )),
        "{message}"
    );
    // Through /status too, and a patch of any kind that changes it is invalid (422).
    assert_status(
        &put(&s, &format!("{path}/status"), &other).await,
        409,
        "Conflict",
    );
    let r = merge(
        &s,
        &path,
        &json!({"metadata": {"uid": "x", "labels": {"moved": "yes"}}}),
    )
    .await;
    assert_status(&r, 422, "Invalid");
    assert_eq!(
        r.json()["message"],
        "VolumeAttachment.storage.k8s.io \"a\" is invalid: metadata.uid: Invalid value: \"x\": field is immutable"
    );
    for (ct, body) in [
        (
            "application/strategic-merge-patch+json",
            json!({"metadata": {"uid": "x"}}),
        ),
        (
            "application/json-patch+json",
            json!([{"op": "replace", "path": "/metadata/uid", "value": "x"}]),
        ),
    ] {
        assert_status(
            &http(&s, "PATCH", &path, Some(ct), Some(&body)).await,
            422,
            "Invalid",
        );
    }
    assert_status(
        &merge(
            &s,
            &format!("{path}/status"),
            &json!({"metadata": {"uid": "x"}}),
        )
        .await,
        422,
        "Invalid",
    );
    assert_eq!(
        s.get("volumeattachments", None, "a").unwrap(),
        before,
        "refused writes change nothing"
    );
    // The same uid, or none, is fine.
    let mut same = before.clone();
    same["metadata"]["labels"] = json!({"kept": "uid"});
    assert_eq!(put(&s, &path, &same).await.status, 200);
    same["metadata"].as_object_mut().unwrap().remove("uid");
    same["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let r = put(&s, &path, &same).await.json();
    assert_eq!(r["metadata"]["uid"], a["metadata"]["uid"]);
}

/// Strategic merge patch as the real server applies it to built-in types: merge lists merge
/// (finalizers as a set, ownerReferences by uid, conditions by type), other lists are replaced,
/// and the directives work. A JSON merge patch of the same body replaces lists.
#[tokio::test]
async fn strategic_merge_patch_follows_the_patch_strategies() {
    let s = FakeApiServer::start().await;
    let smp = |path: String, body: Value| {
        let s = s.clone();
        async move {
            http(
                &s,
                "PATCH",
                &path,
                Some("application/strategic-merge-patch+json"),
                Some(&body),
            )
            .await
        }
    };
    let mut obj = va("a");
    obj["metadata"]["finalizers"] = json!(["f1", "f2"]);
    obj["metadata"]["ownerReferences"] = json!([
        {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "u1"},
        {"apiVersion": "v1", "kind": "Node", "name": "n2", "uid": "u2"},
    ]);
    post(&s, VA, &obj).await;
    let path = format!("{VA}/a");

    // finalizers: patchStrategy merge, a set of strings. The patch's order comes first, then
    // the live list's (apimachinery's normalizeElementOrder).
    let r = smp(
        path.clone(),
        json!({"metadata": {"finalizers": ["f3", "f1"]}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["metadata"]["finalizers"],
        json!(["f3", "f1", "f2"])
    );
    let r = smp(
        path.clone(),
        json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["f2"]}}),
    )
    .await;
    assert_eq!(r.json()["metadata"]["finalizers"], json!(["f3", "f1"]));
    let r = smp(
        path.clone(),
        json!({"metadata": {"$setElementOrder/finalizers": ["f1", "f3"], "finalizers": ["f1"]}}),
    )
    .await;
    assert_eq!(r.json()["metadata"]["finalizers"], json!(["f1", "f3"]));

    // ownerReferences: merged by uid; `$patch: delete` removes one; fields of a match merge.
    let r = smp(
        path.clone(),
        json!({"metadata": {"ownerReferences": [
            {"uid": "u2", "name": "n2-renamed"},
            {"uid": "u1", "$patch": "delete"},
            {"apiVersion": "v1", "kind": "Node", "name": "n3", "uid": "u3"},
        ]}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let refs = r.json()["metadata"]["ownerReferences"].clone();
    assert_eq!(
        refs,
        json!([
            {"apiVersion": "v1", "kind": "Node", "name": "n2-renamed", "uid": "u2"},
            {"apiVersion": "v1", "kind": "Node", "name": "n3", "uid": "u3"},
        ])
    );
    // `$patch: replace` in a merge list replaces it; an item without its merge key is refused.
    let r = smp(
        path.clone(),
        json!({"metadata": {"ownerReferences": [
            {"$patch": "replace"},
            {"apiVersion": "v1", "kind": "Node", "name": "n9", "uid": "u9"},
        ]}}),
    )
    .await;
    assert_eq!(
        r.json()["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Node", "name": "n9", "uid": "u9"}])
    );
    let r = smp(
        path.clone(),
        json!({"metadata": {"ownerReferences": [{"name": "no-uid"}]}}),
    )
    .await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(
        r.body.contains("does not contain declared merge key: uid"),
        "{}",
        r.body
    );

    // Maps merge; `$patch: replace` and `$patch: delete` act on a whole map; null deletes.
    let r = smp(
        path.clone(),
        json!({"metadata": {"labels": {"a": "1", "b": "2"}}}),
    )
    .await;
    assert_eq!(r.json()["metadata"]["labels"], json!({"a": "1", "b": "2"}));
    let r = smp(
        path.clone(),
        json!({"metadata": {"labels": {"$patch": "replace", "c": "3"}}}),
    )
    .await;
    assert_eq!(r.json()["metadata"]["labels"], json!({"c": "3"}));
    let r = smp(
        path.clone(),
        json!({"metadata": {"labels": {"c": null, "d": "4"}}}),
    )
    .await;
    assert_eq!(r.json()["metadata"]["labels"], json!({"d": "4"}));
    let r = smp(
        path.clone(),
        json!({"metadata": {"labels": {"$patch": "sideways"}}}),
    )
    .await;
    assert_eq!(r.status, 500, "{}", r.body);
    let r = smp(
        path.clone(),
        json!({"metadata": {"labels": {"$patch": "delete"}}}),
    )
    .await;
    assert!(r.json()["metadata"].get("labels").is_none(), "{}", r.body);
    let r = smp(
        path.clone(),
        json!({"spec": {"$retainKeys": ["attacher"], "nodeName": "node-z"}}),
    )
    .await;
    assert_status(&r, 400, "BadRequest");
    assert_eq!(r.json()["message"], "invalid patch format of retainKeys");

    // A JSON merge patch replaces the same lists whole.
    let r = merge(&s, &path, &json!({"metadata": {"finalizers": ["only"]}})).await;
    assert_eq!(r.json()["metadata"]["finalizers"], json!(["only"]));

    // Lists without a merge strategy are replaced by a strategic merge patch too (PV access
    // modes); Node conditions and PVC conditions merge by type.
    s.create(
        "persistentvolumes",
        json!({"metadata": {"name": "pv"}, "spec": {"accessModes": ["ReadWriteOnce", "ReadOnlyMany"]}}),
    )
    .unwrap();
    let r = smp(
        "/api/v1/persistentvolumes/pv".into(),
        json!({"spec": {"accessModes": ["ReadWriteMany"]}}),
    )
    .await;
    assert_eq!(r.json()["spec"]["accessModes"], json!(["ReadWriteMany"]));
    s.create(
        "nodes",
        json!({"metadata": {"name": "n1"}, "status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "DiskPressure", "status": "False"},
        ]}}),
    )
    .unwrap();
    let r = smp(
        "/api/v1/nodes/n1/status".into(),
        json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletDown"}]}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["status"]["conditions"],
        json!([
            {"type": "Ready", "status": "False", "reason": "KubeletDown"},
            {"type": "DiskPressure", "status": "False"},
        ])
    );
}

#[tokio::test]
async fn delete_with_finalizers_waits_for_them() {
    let s = FakeApiServer::start().await;
    let mut obj = va("a");
    obj["metadata"]["finalizers"] = json!(["external-attacher/rds-csi-srvlab-io"]);
    let a = post(&s, VA, &obj).await.json();
    let start_rv = rv(&a);
    let path = format!("{VA}/a");

    let d = delete(&s, &path).await;
    assert_eq!(d.status, 200, "{}", d.body);
    let d = d.json();
    assert_eq!(d["kind"], "VolumeAttachment");
    let ts = d["metadata"]["deletionTimestamp"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(rv(&d), start_rv + 1);
    assert_eq!(get(&s, &path).await.status, 200, "still there");
    // Deleting again changes nothing.
    let again = delete(&s, &path).await.json();
    assert_eq!(again["metadata"]["deletionTimestamp"], ts.as_str());
    assert_eq!(rv(&again), start_rv + 1);
    // No new finalizers while being deleted.
    let r = merge(
        &s,
        &path,
        &json!({"metadata": {"finalizers": ["external-attacher/rds-csi-srvlab-io", "other"]}}),
    )
    .await;
    assert_status(&r, 422, "Invalid");
    // Other changes are fine.
    assert_eq!(
        merge(&s, &path, &json!({"metadata": {"labels": {"l": "v"}}}))
            .await
            .status,
        200
    );
    // Emptying the finalizers removes it.
    let last = merge(&s, &path, &json!({"metadata": {"finalizers": null}})).await;
    assert_eq!(last.status, 200);
    assert_status(&get(&s, &path).await, 404, "NotFound");

    let w = get(
        &s,
        &format!("{VA}?watch=true&resourceVersion={start_rv}&timeoutSeconds=1"),
    )
    .await;
    let types: Vec<String> = w
        .events()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, vec!["MODIFIED", "MODIFIED", "DELETED"]);
    assert_eq!(
        w.events()[2]["object"]["metadata"]["resourceVersion"],
        (start_rv + 3).to_string()
    );

    // Without finalizers: gone at once, answered with a Success status.
    let b = post(&s, VA, &va("b")).await.json();
    let d = delete(&s, &format!("{VA}/b")).await;
    assert_eq!(d.status, 200);
    let d = d.json();
    assert_eq!(d["kind"], "Status");
    assert_eq!(d["status"], "Success");
    assert_eq!(d["details"]["uid"], b["metadata"]["uid"]);
    assert_status(&delete(&s, &format!("{VA}/b")).await, 404, "NotFound");

    // Preconditions.
    let c = post(&s, VA, &va("c")).await.json();
    let pre = json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": "1"}});
    assert_status(
        &http(
            &s,
            "DELETE",
            &format!("{VA}/c"),
            Some("application/json"),
            Some(&pre),
        )
        .await,
        409,
        "Conflict",
    );
    let pre = json!({"preconditions": {"uid": c["metadata"]["uid"]}});
    assert_eq!(
        http(
            &s,
            "DELETE",
            &format!("{VA}/c"),
            Some("application/json"),
            Some(&pre)
        )
        .await
        .status,
        200
    );

    // The helper takes the same path.
    let mut e = va("e");
    e["metadata"]["finalizers"] = json!(["f"]);
    s.create("volumeattachments", e).unwrap();
    assert!(matches!(
        s.delete("volumeattachments", None, "e").unwrap(),
        DeleteOutcome::Pending(_)
    ));
    assert!(
        s.get("volumeattachments", None, "e").unwrap()["metadata"]["deletionTimestamp"].is_string()
    );
    s.remove_finalizers("volumeattachments", None, "e").unwrap();
    assert!(s.get("volumeattachments", None, "e").is_none());
}

#[tokio::test]
async fn status_subresource_changes_only_status() {
    let s = FakeApiServer::start().await;
    let a = post(&s, VA, &va("a")).await.json();
    let mut body = a.clone();
    body["status"] = json!({"attached": true, "attachmentMetadata": {"k": "v"}});
    body["spec"]["nodeName"] = json!("elsewhere");
    body["metadata"]["labels"] = json!({"ignored": "yes"});
    let r = put(&s, &format!("{VA}/a/status"), &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = r.json();
    assert_eq!(r["status"]["attached"], true);
    assert_eq!(r["spec"]["nodeName"], "node-b");
    assert!(r["metadata"].get("labels").is_none());
    assert_eq!(rv(&r), rv(&a) + 1);
    // Stale resourceVersion on /status: 409 too.
    assert_status(
        &put(&s, &format!("{VA}/a/status"), &body).await,
        409,
        "Conflict",
    );

    let p = merge(
        &s,
        &format!("{VA}/a/status"),
        &json!({"status": {"attachError": {"message": "boom"}}, "spec": {"nodeName": "x"}}),
    )
    .await
    .json();
    assert_eq!(p["status"]["attachError"]["message"], "boom");
    assert_eq!(p["status"]["attached"], true);
    assert_eq!(p["spec"]["nodeName"], "node-b");
    assert_eq!(
        get(&s, &format!("{VA}/a/status")).await.json()["status"]["attached"],
        true
    );
    // Through the main resource, status is ignored.
    let m = merge(
        &s,
        &format!("{VA}/a"),
        &json!({"status": {"attached": false}}),
    )
    .await
    .json();
    assert_eq!(m["status"]["attached"], true);
    assert_eq!(
        m["metadata"]["resourceVersion"], p["metadata"]["resourceVersion"],
        "a no-op"
    );
    assert_status(
        &merge(&s, &format!("{VA}/zz/status"), &json!({})).await,
        404,
        "NotFound",
    );

    // Nodes and PVs and PVCs too.
    s.create("nodes", json!({"metadata": {"name": "n1"}}))
        .unwrap();
    let n = merge(
        &s,
        "/api/v1/nodes/n1/status",
        &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    )
    .await
    .json();
    assert_eq!(n["status"]["conditions"][0]["type"], "Ready");
    s.create(
        "persistentvolumeclaims",
        json!({"metadata": {"name": "c", "namespace": "ns"}}),
    )
    .unwrap();
    let c = merge(
        &s,
        "/api/v1/namespaces/ns/persistentvolumeclaims/c/status",
        &json!({"status": {"phase": "Bound"}}),
    )
    .await
    .json();
    assert_eq!(c["status"]["phase"], "Bound");
    let helper = s
        .patch_status(
            "persistentvolumeclaims",
            Some("ns"),
            "c",
            json!({"status": {"phase": "Lost"}}),
        )
        .unwrap();
    assert_eq!(helper["status"]["phase"], "Lost");
}

#[tokio::test]
async fn the_call_log_records_api_requests_only() {
    let s = FakeApiServer::start().await;
    s.create("volumeattachments", va("internal")).unwrap();
    post(&s, VA, &va("a")).await;
    get(&s, &format!("{VA}?limit=5&labelSelector=a%3Db")).await;
    get(&s, &format!("{VA}/a")).await;
    merge(
        &s,
        &format!("{VA}/a/status"),
        &json!({"status": {"attached": true}}),
    )
    .await;
    get(&s, "/api/v1/namespaces/ns1/persistentvolumeclaims/x").await;
    get(&s, &format!("{VA}?watch=1&timeoutSeconds=1")).await;
    delete(&s, &format!("{VA}/a")).await;
    get(&s, "/__fake/calls").await;
    get(&s, "/version").await;

    let calls = s.calls();
    type Summary = (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<u16>,
    );
    let summary: Vec<Summary> = calls
        .iter()
        .map(|c| {
            (
                c.verb.clone(),
                c.resource.clone(),
                c.subresource.clone(),
                c.namespace.clone(),
                c.name.clone(),
                c.status,
            )
        })
        .collect();
    let own = |v: &str, r: &str, sub: Option<&str>, ns: Option<&str>, n: Option<&str>, st: u16| {
        (
            v.to_string(),
            r.to_string(),
            sub.map(String::from),
            ns.map(String::from),
            n.map(String::from),
            Some(st),
        )
    };
    assert_eq!(
        summary,
        vec![
            own("create", "volumeattachments", None, None, None, 201),
            own("list", "volumeattachments", None, None, None, 200),
            own("get", "volumeattachments", None, None, Some("a"), 200),
            own(
                "patch",
                "volumeattachments",
                Some("status"),
                None,
                Some("a"),
                200
            ),
            own(
                "get",
                "persistentvolumeclaims",
                None,
                Some("ns1"),
                Some("x"),
                404
            ),
            own("watch", "volumeattachments", None, None, None, 200),
            own("delete", "volumeattachments", None, None, Some("a"), 200),
            own("get", "", None, None, None, 200),
        ]
    );
    assert_eq!(calls[0].body.as_ref().unwrap()["metadata"]["name"], "a");
    assert_eq!(calls[0].group, "storage.k8s.io");
    assert_eq!(calls[1].params()["labelSelector"], "a=b");
    assert_eq!(calls[1].path, VA);
    assert_eq!(
        calls[3].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(calls[3].body, Some(json!({"status": {"attached": true}})));
    assert!(calls
        .windows(2)
        .all(|w| w[0].at <= w[1].at && w[0].id < w[1].id));
    assert_eq!(s.calls_matching("get", "*").len(), 3);
    assert_eq!(
        s.calls_matching("*", "volumeattachments.storage.k8s.io")
            .len(),
        6
    );
    assert_eq!(s.count_calls("watch", "volumeattachments"), 1);

    // The admin API serves the same log.
    let log = get(&s, "/__fake/calls").await.json();
    assert_eq!(log.as_array().unwrap().len(), 8);
    assert_eq!(log[3]["subresource"], "status");
    assert_eq!(
        http(&s, "DELETE", "/__fake/calls", None, None).await.status,
        200
    );
    assert!(s.calls().is_empty());
    get(&s, VA).await;
    s.clear_calls();
    assert!(s.calls().is_empty());
}

#[tokio::test]
async fn faults_fail_hang_delay_and_conflict() {
    let s = FakeApiServer::start().await;
    s.create("nodes", json!({"metadata": {"name": "n1"}}))
        .unwrap();

    // Fail N times.
    s.fail_times("get", "nodes", 500, 2);
    assert_status(&get(&s, "/api/v1/nodes/n1").await, 500, "InternalError");
    assert_status(&get(&s, "/api/v1/nodes/n1").await, 500, "InternalError");
    assert_eq!(get(&s, "/api/v1/nodes/n1").await.status, 200);
    assert!(s.faults().is_empty());

    // Fail writes until cleared; reads unaffected.
    s.fail_writes(503);
    let r = post(&s, VA, &va("a")).await;
    assert_status(&r, 503, "ServiceUnavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_status(
        &merge(&s, "/api/v1/nodes/n1", &json!({})).await,
        503,
        "ServiceUnavailable",
    );
    assert_status(
        &delete(&s, "/api/v1/nodes/n1").await,
        503,
        "ServiceUnavailable",
    );
    assert_status(
        &put(&s, "/api/v1/nodes/n1", &json!({})).await,
        503,
        "ServiceUnavailable",
    );
    assert_eq!(get(&s, "/api/v1/nodes").await.status, 200);
    assert_eq!(
        s.calls_matching("create", "volumeattachments")[0].status,
        Some(503)
    );
    s.clear_faults();
    assert_eq!(post(&s, VA, &va("a")).await.status, 201);

    // Resource-specific, with a name filter.
    s.add_fault(
        FaultRule::fail("patch", "volumeattachments", 403)
            .name("a")
            .message("nope"),
    );
    let r = merge(&s, &format!("{VA}/a"), &json!({})).await;
    assert_status(&r, 403, "Forbidden");
    assert_eq!(r.json()["message"], "nope");
    assert_eq!(merge(&s, "/api/v1/nodes/n1", &json!({})).await.status, 200);
    s.clear_faults();

    // Conflict on patch.
    s.conflict_on_patch(1);
    let r = merge(
        &s,
        &format!("{VA}/a"),
        &json!({"metadata": {"labels": {"a": "b"}}}),
    )
    .await;
    assert_status(&r, 409, "Conflict");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("the object has been modified"));
    assert_eq!(
        merge(
            &s,
            &format!("{VA}/a"),
            &json!({"metadata": {"labels": {"a": "b"}}})
        )
        .await
        .status,
        200
    );

    // Latency.
    s.set_latency(Duration::from_millis(200));
    let t = Instant::now();
    assert_eq!(get(&s, "/api/v1/nodes").await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(200));
    s.clear_faults();
    s.delay("list", "nodes", Duration::from_millis(150));
    let t = Instant::now();
    get(&s, "/api/v1/nodes").await;
    assert!(t.elapsed() >= Duration::from_millis(150));
    s.clear_faults();

    // Hang until cleared; the call is logged while pending.
    let id = s.hang("get", "nodes");
    let s2 = s.clone();
    let pending = tokio::spawn(async move { get(&s2, "/api/v1/nodes/n1").await });
    assert!(s.wait_for_calls("get", "nodes", 4, DEADLINE).await);
    eventually("the request reached its hang", || s.held_requests() == 1).await;
    assert!(!pending.is_finished(), "a hung request answers nothing");
    assert_eq!(
        s.calls_matching("get", "nodes").last().unwrap().status,
        None
    );
    assert_eq!(
        get(&s, "/api/v1/nodes").await.status,
        200,
        "other verbs are fine"
    );
    s.remove_fault(id);
    let r = tokio::time::timeout(DEADLINE, pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    let answered = s.calls_matching("get", "nodes").last().unwrap().clone();
    assert_eq!(answered.status, Some(200));
    assert!(answered.answered_at.is_some_and(|t| t >= answered.at) && !answered.abandoned);
    // A hung request is in flight from the moment it arrives until its client goes away.
    let id = s.hang("patch", "nodes");
    let mut client = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let body = r#"{"metadata":{"labels":{"a":"b"}}}"#;
    client
        .write_all(
            format!(
                "PATCH /api/v1/nodes/n1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {HARNESS_TOKEN}\r\nContent-Type: application/merge-patch+json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let before = s.count_calls("patch", "nodes");
    assert!(
        s.wait_for_calls("patch", "nodes", before + 1, DEADLINE)
            .await
    );
    let hung = s.calls_matching("patch", "nodes").pop().unwrap();
    assert!(hung.in_flight(), "{hung:?}");
    assert_eq!(hung.body, Some(json!({"metadata": {"labels": {"a": "b"}}})));
    drop(client);
    eventually("the abandoned request is marked", || {
        s.calls_matching("patch", "nodes").last().unwrap().abandoned
    })
    .await;
    let gone = s.calls_matching("patch", "nodes").pop().unwrap();
    assert!(!gone.in_flight() && gone.status.is_none() && gone.answered_at.is_none());
    assert_eq!(
        s.calls_json().as_array().unwrap().last().unwrap()["abandoned"],
        true
    );
    s.remove_fault(id);
    // A hang with a count catches only that many requests.
    s.add_fault(FaultRule::hang("list", "persistentvolumes").times(1));
    let s3 = s.clone();
    let held = tokio::spawn(async move { get(&s3, "/api/v1/persistentvolumes").await });
    assert!(
        s.wait_for_calls("list", "persistentvolumes", 1, DEADLINE)
            .await
    );
    assert_eq!(get(&s, "/api/v1/persistentvolumes").await.status, 200);
    assert!(!held.is_finished());
    s.clear_faults();
    assert_eq!(
        tokio::time::timeout(DEADLINE, held)
            .await
            .unwrap()
            .unwrap()
            .status,
        200
    );

    // Watch failures.
    s.fail("watch", "*", 500);
    assert_status(
        &get(&s, &format!("{VA}?watch=true")).await,
        500,
        "InternalError",
    );
    s.clear_faults();

    // Over HTTP.
    let r = post(
        &s,
        "/__fake/faults",
        &json!({"verb": "list", "resource": "persistentvolumes", "status": 429, "times": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let f = get(&s, "/__fake/faults").await.json();
    assert_eq!(f["rules"][0]["status"], 429);
    let r = get(&s, "/api/v1/persistentvolumes").await;
    assert_status(&r, 429, "TooManyRequests");
    assert_eq!(get(&s, "/api/v1/persistentvolumes").await.status, 200);
    post(
        &s,
        "/__fake/faults",
        &json!({"fail_writes": 500, "latency_ms": 10}),
    )
    .await;
    assert_status(&post(&s, VA, &va("z")).await, 500, "InternalError");
    assert_eq!(
        http(&s, "DELETE", "/__fake/faults", None, None)
            .await
            .status,
        200
    );
    assert_eq!(post(&s, VA, &va("z")).await.status, 201);
    assert_eq!(
        get(&s, "/__fake/faults").await.json(),
        json!({"latency_ms": 0, "rules": []})
    );
    assert!(s.calls().iter().all(|c| !c.path.starts_with("/__fake")));
}

/// A cache can be made to lag on purpose: a forged event reaches the open watches only, and a
/// deletion can skip them; live reads always see the store.
#[tokio::test]
async fn watches_can_be_told_what_live_reads_deny() {
    let s = FakeApiServer::start().await;
    s.create("nodes", json!({"metadata": {"name": "n1"}}))
        .unwrap();
    s.create("nodes", json!({"metadata": {"name": "n2"}}))
        .unwrap();
    let rv_before = s.resource_version();
    let s2 = s.clone();
    let watching = tokio::spawn(async move {
        watch_events(
            &s2,
            &format!("/api/v1/nodes?watch=1&resourceVersion={rv_before}"),
            2,
        )
        .await
    });
    eventually("the watch is open", || s.open_watches(Some("nodes")) == 1).await;

    let n1 = s.get("nodes", None, "n1").unwrap();
    assert_eq!(s.forge_watch_event("nodes", "DELETED", n1.clone()), 1);
    assert!(s.get("nodes", None, "n1").is_some(), "n1 still exists");
    assert_eq!(get(&s, "/api/v1/nodes/n1").await.status, 200);

    let gone = s.delete_unwatched("nodes", None, "n2").unwrap();
    assert_status(&get(&s, "/api/v1/nodes/n2").await, 404, "NotFound");
    // The next real change is what the open watch sees after the forged event.
    s.create("nodes", json!({"metadata": {"name": "n3"}}))
        .unwrap();
    let seen = tokio::time::timeout(DEADLINE, watching)
        .await
        .unwrap()
        .unwrap();
    let seen: Vec<(&str, &str)> = seen
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    // n2's deletion came before n3's creation, and never reached this watch.
    assert_eq!(seen, [("DELETED", "n1"), ("ADDED", "n3")]);
    // A watch resuming from before the silent deletion does learn of it.
    let resumed = watch_events(
        &s,
        &format!("/api/v1/nodes?watch=1&resourceVersion={rv_before}"),
        2,
    )
    .await;
    assert_eq!(resumed[0]["type"], "DELETED");
    assert_eq!(resumed[0]["object"]["metadata"]["name"], "n2");
    assert_eq!(
        resumed[0]["object"]["metadata"]["resourceVersion"],
        gone["metadata"]["resourceVersion"]
    );
}

#[tokio::test]
async fn watch_streams_events_bookmarks_and_errors() {
    let s = FakeApiServer::start().await;
    s.set_bookmark_interval(Duration::from_millis(100));
    for n in ["a", "b", "c"] {
        s.create("volumeattachments", va(n)).unwrap();
    }
    let from = s.resource_version();
    s.create("volumeattachments", va("d")).unwrap();
    s.patch(
        "volumeattachments",
        None,
        "a",
        json!({"metadata": {"labels": {"app": "x"}}}),
    )
    .unwrap();
    s.delete("volumeattachments", None, "b").unwrap();
    s.create("nodes", json!({"metadata": {"name": "n"}}))
        .unwrap();

    // From a resourceVersion: what happened after it, to this resource only; a timeout ends the
    // stream cleanly.
    let r = get(
        &s,
        &format!("{VA}?watch=true&resourceVersion={from}&timeoutSeconds=1"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked")));
    assert!(!r.truncated, "a timeout ends the stream cleanly");
    let ev = r.events();
    let got: Vec<(String, String, String)> = ev
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().into(),
                e["object"]["metadata"]["name"].as_str().unwrap().into(),
                e["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .into(),
            )
        })
        .collect();
    let t = |k: &str, n: &str, r: u64| (k.to_string(), n.to_string(), r.to_string());
    assert_eq!(
        got,
        vec![
            t("ADDED", "d", from + 1),
            t("MODIFIED", "a", from + 2),
            t("DELETED", "b", from + 3)
        ]
    );
    assert_eq!(ev[0]["object"]["kind"], "VolumeAttachment");

    // Without a resourceVersion: the current state as ADDED.
    let ev = watch_events(&s, &format!("{VA}?watch=1"), 3).await;
    assert!(ev.iter().all(|e| e["type"] == "ADDED"));
    assert_eq!(
        ev.iter()
            .map(|e| e["object"]["metadata"]["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["a", "c", "d"]
    );

    // Bookmarks: only apiVersion, kind and resourceVersion.
    let ev = watch_events(
        &s,
        &format!(
            "{VA}?watch=1&resourceVersion={}&allowWatchBookmarks=true",
            s.resource_version()
        ),
        3,
    )
    .await;
    assert!(ev.iter().all(|e| e["type"] == "BOOKMARK"));
    assert_eq!(
        ev[0]["object"],
        json!({"kind": "VolumeAttachment", "apiVersion": "storage.k8s.io/v1", "metadata": {"resourceVersion": s.resource_version().to_string()}})
    );

    // sendInitialEvents: the state, then a bookmark marking its end.
    let ev = watch_events(&s, &format!("{VA}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"), 4).await;
    assert_eq!(
        ev.iter().take(3).filter(|e| e["type"] == "ADDED").count(),
        3
    );
    assert_eq!(ev[3]["type"], "BOOKMARK");
    assert_eq!(
        ev[3]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_status(
        &get(
            &s,
            &format!("{VA}?watch=1&resourceVersionMatch=NotOlderThan"),
        )
        .await,
        422,
        "Invalid",
    );

    // Live events, through a label selector: entering is ADDED, leaving is DELETED.
    let s2 = s.clone();
    let now = s.resource_version();
    let watches = s.calls_matching("watch", "volumeattachments").len();
    let live = tokio::spawn(async move {
        watch_events(
            &s2,
            &format!("{VA}?watch=1&resourceVersion={now}&labelSelector=app%3Dx"),
            3,
        )
        .await
    });
    watch_established(&s, watches + 1).await;
    s.patch(
        "volumeattachments",
        None,
        "c",
        json!({"metadata": {"labels": {"app": "x"}}}),
    )
    .unwrap();
    s.patch(
        "volumeattachments",
        None,
        "a",
        json!({"metadata": {"labels": {"app": "y"}}}),
    )
    .unwrap();
    s.create("volumeattachments", va("e")).unwrap();
    s.patch(
        "volumeattachments",
        None,
        "c",
        json!({"metadata": {"annotations": {"k": "v"}}}),
    )
    .unwrap();
    let got: Vec<(String, String)> = live
        .await
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().into(),
                e["object"]["metadata"]["name"].as_str().unwrap().into(),
            )
        })
        .collect();
    let p = |k: &str, n: &str| (k.to_string(), n.to_string());
    assert_eq!(
        got,
        vec![p("ADDED", "c"), p("DELETED", "a"), p("MODIFIED", "c")]
    );
    eventually("every watch is closed", || s.open_watches(None) == 0).await;

    // Too old: one ERROR event, 410 Expired, and the end.
    s.compact_history();
    let r = get(&s, &format!("{VA}?watch=1&resourceVersion={from}")).await;
    let ev = r.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["type"], "ERROR");
    assert_eq!(ev[0]["object"]["kind"], "Status");
    assert_eq!(ev[0]["object"]["code"], 410);
    assert_eq!(ev[0]["object"]["reason"], "Expired");
    // A small history limit expires old resourceVersions too.
    s.set_history_limit(2);
    let before = s.resource_version();
    for n in ["f", "g", "h"] {
        s.create("volumeattachments", va(n)).unwrap();
    }
    assert_eq!(
        get(&s, &format!("{VA}?watch=1&resourceVersion={before}"))
            .await
            .events()[0]["type"],
        "ERROR"
    );
    let ev = watch_events(
        &s,
        &format!("{VA}?watch=1&resourceVersion={}", before + 1),
        2,
    )
    .await;
    assert_eq!(
        ev.iter()
            .map(|e| e["object"]["metadata"]["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["g", "h"]
    );

    // drop_watches cuts open streams mid-way.
    eventually("no watch is open", || s.open_watches(None) == 0).await;
    let s3 = s.clone();
    let cut = tokio::spawn(async move {
        get(
            &s3,
            &format!(
                "{VA}?watch=1&resourceVersion={}&timeoutSeconds=30",
                before + 3
            ),
        )
        .await
    });
    eventually("the watch is open", || s.open_watches(None) == 1).await;
    s.drop_watches();
    let r = tokio::time::timeout(Duration::from_secs(5), cut)
        .await
        .expect("the stream ends")
        .unwrap();
    assert!(r.truncated, "no clean end: {r:?}");
    eventually("the watch is closed", || s.open_watches(None) == 0).await;
}

// ------------------------------------------------------------------------------------------
// kube-rs
// ------------------------------------------------------------------------------------------

async fn kube_client(s: &FakeApiServer) -> (kube::Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = s.write_kubeconfig(dir.path());
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(cfg.default_namespace, "default");
    assert_eq!(cfg.cluster_url.to_string().trim_end_matches('/'), s.url());
    (kube::Client::try_from(cfg).unwrap(), dir)
}

/// Waits until the `n`th watch request was answered (so its stream is registered).
async fn watch_established(s: &FakeApiServer, n: usize) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let watches = s.calls_matching("watch", "volumeattachments");
        if watches.len() >= n && watches[n - 1].status == Some(200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "watch #{n} not established: {watches:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn typed_va(name: &str) -> VolumeAttachment {
    serde_json::from_value(va(name)).unwrap()
}

fn api_code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API error: {other:?}"),
    }
}

#[tokio::test]
async fn kube_client_crud_on_volume_attachments() {
    let s = FakeApiServer::start().await;
    let (client, _dir) = kube_client(&s).await;
    let info = client.apiserver_version().await.unwrap();
    assert_eq!(info.git_version, "v1.34.0");
    let api: Api<VolumeAttachment> = Api::all(client.clone());

    let created = api
        .create(&PostParams::default(), &typed_va("va-a"))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert_eq!(created.status.as_ref().map(|s| s.attached), Some(false));
    let e = api
        .create(&PostParams::default(), &typed_va("va-a"))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), 409);
    let got = api.get("va-a").await.unwrap();
    assert_eq!(
        got.metadata.resource_version,
        created.metadata.resource_version
    );
    assert!(api.get_opt("missing").await.unwrap().is_none());
    assert_eq!(api_code(&api.get("missing").await.unwrap_err()), 404);

    // List, 10 a page.
    for i in 0..24 {
        s.create("volumeattachments", va(&format!("va-{i:02}")))
            .unwrap();
    }
    let mut seen = vec![];
    let mut lp = ListParams::default().limit(10);
    let mut pages = 0;
    loop {
        let page = api.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 10);
        seen.extend(page.items.iter().map(|v| v.name_any()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => lp = ListParams::default().limit(10).continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted);

    // Patch (merge), status patch, replace with a stale version.
    let patched = api
        .patch(
            "va-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "storage"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.labels().get("team").map(String::as_str),
        Some("storage")
    );
    let st = api
        .patch_status(
            "va-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"attached": true}})),
        )
        .await
        .unwrap();
    assert!(st.status.unwrap().attached);
    let mut stale = created.clone();
    stale.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
    assert_eq!(
        api_code(
            &api.replace("va-a", &PostParams::default(), &stale)
                .await
                .unwrap_err()
        ),
        409
    );
    let mut fresh = api.get("va-a").await.unwrap();
    fresh.metadata.finalizers = Some(vec!["external-attacher/rds-csi-srvlab-io".into()]);
    let replaced = api
        .replace("va-a", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_eq!(replaced.finalizers().len(), 1);
    s.conflict_on_patch(1);
    let e = api
        .patch("va-a", &PatchParams::default(), &Patch::Merge(json!({})))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), 409);

    // Delete: pending while finalizers remain, then gone.
    let pending = api.delete("va-a", &DeleteParams::default()).await.unwrap();
    let pending = pending.left().expect("the object, still being deleted");
    assert!(pending.metadata.deletion_timestamp.is_some());
    api.patch(
        "va-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(api.get_opt("va-a").await.unwrap().is_none());
    let gone = api.delete("va-00", &DeleteParams::default()).await.unwrap();
    let status = gone.right().expect("a Status for an immediate delete");
    assert_eq!(
        status.status,
        Some(kube::core::response::StatusSummary::Success)
    );
    assert_eq!(
        api_code(
            &api.delete("va-00", &DeleteParams::default())
                .await
                .unwrap_err()
        ),
        404
    );

    // Calls are visible as kube-rs made them.
    assert!(s.count_calls("list", "volumeattachments") >= 3);
    assert_eq!(
        s.calls_matching("patch", "volumeattachments")
            .iter()
            .filter(|c| c.subresource.as_deref() == Some("status"))
            .count(),
        1
    );
}

#[tokio::test]
async fn kube_client_on_core_resources_and_events() {
    let s = FakeApiServer::start().await;
    let (client, _dir) = kube_client(&s).await;
    s.create(
        "nodes",
        json!({"metadata": {"name": "node-b", "labels": {"zone": "a"}}}),
    )
    .unwrap();
    s.create("nodes", json!({"metadata": {"name": "node-c"}}))
        .unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes
        .list(&ListParams::default().labels("zone=a"))
        .await
        .unwrap();
    assert_eq!(
        list.items.iter().map(|n| n.name_any()).collect::<Vec<_>>(),
        vec!["node-b"]
    );
    let list = nodes
        .list(&ListParams::default().fields("metadata.name=node-c"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);

    let pvcs: Api<PersistentVolumeClaim> = Api::default_namespaced(client.clone());
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {"name": "disk"}, "spec": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}})).unwrap();
    let created = pvcs.create(&PostParams::default(), &pvc).await.unwrap();
    assert_eq!(created.namespace().as_deref(), Some("default"));
    assert!(s
        .get("persistentvolumeclaims", Some("default"), "disk")
        .is_some());

    let ev: CoreEvent = serde_json::from_value(json!({
        "metadata": {"generateName": "disk."},
        "involvedObject": {"kind": "PersistentVolumeClaim", "name": "disk", "namespace": "default"},
        "reason": "Provisioned", "message": "ok", "type": "Normal",
    }))
    .unwrap();
    // Not in another namespace than the claim's.
    let elsewhere: Api<CoreEvent> = Api::namespaced(client.clone(), "kube-system");
    let err = elsewhere
        .create(&PostParams::default(), &ev)
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), 422, "{err}");
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let ev = events.create(&PostParams::default(), &ev).await.unwrap();
    assert!(ev.name_any().starts_with("disk."));
    let all: Api<CoreEvent> = Api::all(client.clone());
    assert_eq!(
        all.list(&ListParams::default().fields("involvedObject.name=disk"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    let recorder: Api<EventV1> = Api::namespaced(client.clone(), "default");
    let ev: EventV1 = serde_json::from_value(json!({
        "metadata": {"name": "e1"},
        "eventTime": "2025-01-01T00:00:00.000000Z",
        "reportingController": "rds.csi.srvlab.io", "reportingInstance": "rds-csi-0",
        "action": "Attach", "reason": "Attached", "type": "Normal",
        "regarding": {"kind": "PersistentVolume", "name": "pv-1"},
    }))
    .unwrap();
    recorder.create(&PostParams::default(), &ev).await.unwrap();
    assert_eq!(s.list("events.events.k8s.io", None).len(), 1);
    assert_eq!(s.list("events", None).len(), 1);
    assert_eq!(s.count_calls("create", "events"), 3);
}

/// Leases, as csi-lib-utils keeps them and the driver follows them: namespaced, MicroTime fields
/// kept as written, one object selected by name in a list and a watch.
#[tokio::test]
async fn kube_client_follows_one_lease_by_name() {
    let s = FakeApiServer::start().await;
    let (client, _dir) = kube_client(&s).await;
    let lease = |holder: &str| {
        json!({
            "metadata": {"name": "external-attacher-leader-x", "namespace": "ns"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "acquireTime": "2025-01-01T00:00:00.000000Z",
                     "renewTime": "2025-01-01T00:00:05.123456Z", "leaseTransitions": 0},
        })
    };
    s.create("leases", lease("pod-a")).unwrap();
    s.create(
        "leases",
        json!({"metadata": {"name": "another", "namespace": "ns"}, "spec": {}}),
    )
    .unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "ns");
    let got = leases.get("external-attacher-leader-x").await.unwrap();
    let spec = got.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert_eq!(
        spec.renew_time.unwrap().0.to_string(),
        "2025-01-01T00:00:05.123456Z"
    );
    assert!(Api::<Lease>::namespaced(client.clone(), "other")
        .get_opt("external-attacher-leader-x")
        .await
        .unwrap()
        .is_none());

    let cfg = watcher::Config::default().fields("metadata.name=external-attacher-leader-x");
    let mut stream = watcher(leases, cfg).applied_objects().boxed();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(
        first.spec.unwrap().holder_identity.as_deref(),
        Some("pod-a")
    );
    s.patch(
        "leases",
        Some("ns"),
        "another",
        json!({"spec": {"holderIdentity": "unrelated"}}),
    )
    .unwrap();
    s.replace("leases", lease("pod-b")).unwrap();
    let next = stream.next().await.unwrap().unwrap();
    assert_eq!(
        next.metadata.name.as_deref(),
        Some("external-attacher-leader-x")
    );
    assert_eq!(next.spec.unwrap().holder_identity.as_deref(), Some("pod-b"));
    assert_eq!(s.count_calls("list", "leases"), 1);
    assert!(s.calls_matching("watch", "leases")[0]
        .params()
        .get("fieldSelector")
        .is_some_and(|f| f == "metadata.name=external-attacher-leader-x"));
}

#[tokio::test]
async fn kube_reflector_lists_in_pages_watches_and_recovers() {
    let s = FakeApiServer::start().await;
    s.set_bookmark_interval(Duration::from_millis(200));
    for i in 0..300 {
        s.create("volumeattachments", va(&format!("va-{i:03}")))
            .unwrap();
    }
    let (client, _dir) = kube_client(&s).await;
    let api: Api<VolumeAttachment> = Api::all(client);
    let (reader, writer) = reflector::store::<VolumeAttachment>();
    let cfg = watcher::Config::default().page_size(50);
    let stream = reflector(writer, watcher(api, cfg))
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });

    tokio::time::timeout(DEADLINE, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    eventually("the store has 300", || reader.state().len() == 300).await;
    let lists = s.calls_matching("list", "volumeattachments");
    assert_eq!(lists.len(), 6, "300 objects in pages of 50");
    assert!(lists.iter().all(|c| c.params()["limit"] == "50"));
    assert!(lists[1..]
        .iter()
        .all(|c| c.params().contains_key("continue")));
    assert!(
        s.wait_for_calls("watch", "volumeattachments", 1, DEADLINE)
            .await
    );
    let w = &s.calls_matching("watch", "volumeattachments")[0];
    assert_eq!(w.params()["resourceVersion"], "300");
    assert_eq!(w.params()["allowWatchBookmarks"], "true");

    let has = |name: &str| reader.state().iter().any(|v| v.name_any() == name);
    let label_of = |name: &str| {
        reader
            .state()
            .iter()
            .find(|v| v.name_any() == name)
            .and_then(|v| v.labels().get("k").cloned())
    };
    s.create("volumeattachments", va("va-new")).unwrap();
    eventually("the create", || has("va-new")).await;
    s.patch(
        "volumeattachments",
        None,
        "va-007",
        json!({"metadata": {"labels": {"k": "v1"}}}),
    )
    .unwrap();
    eventually("the modify", || label_of("va-007").as_deref() == Some("v1")).await;
    s.delete("volumeattachments", None, "va-008").unwrap();
    eventually("the delete", || !has("va-008")).await;
    assert_eq!(reader.state().len(), 300);

    // A dropped watch is re-established from where it was; no relist.
    watch_established(&s, 1).await;
    s.drop_watches();
    watch_established(&s, 2).await;
    s.create("volumeattachments", va("va-after-drop")).unwrap();
    eventually("an event after the drop", || has("va-after-drop")).await;
    assert_eq!(s.count_calls("list", "volumeattachments"), 6);
    let rewatch = s
        .calls_matching("watch", "volumeattachments")
        .pop()
        .unwrap();
    assert_ne!(
        rewatch.params()["resourceVersion"],
        "300",
        "resumed from a later version"
    );

    // Changes while it is away are delivered from history.
    let hang = s.hang("watch", "volumeattachments");
    s.drop_watches();
    assert!(
        s.wait_for_calls("watch", "volumeattachments", 3, DEADLINE)
            .await
    );
    s.patch(
        "volumeattachments",
        None,
        "va-007",
        json!({"metadata": {"labels": {"k": "v2"}}}),
    )
    .unwrap();
    s.delete("volumeattachments", None, "va-009").unwrap();
    s.remove_fault(hang);
    watch_established(&s, 3).await;
    eventually("the missed changes", || {
        label_of("va-007").as_deref() == Some("v2") && !has("va-009")
    })
    .await;
    assert_eq!(s.count_calls("list", "volumeattachments"), 6);

    // Expired history (410): the watcher relists and converges.
    let hang = s.hang("watch", "volumeattachments");
    s.drop_watches();
    assert!(
        s.wait_for_calls("watch", "volumeattachments", 4, DEADLINE)
            .await
    );
    s.delete("volumeattachments", None, "va-010").unwrap();
    s.create("volumeattachments", va("va-during-gap")).unwrap();
    s.compact_history();
    s.remove_fault(hang);
    eventually("a relist after 410", || {
        s.count_calls("list", "volumeattachments") > 6
    })
    .await;
    eventually("the state after the relist", || {
        has("va-during-gap") && !has("va-010")
    })
    .await;
    assert_eq!(
        reader.state().len(),
        s.list("volumeattachments", None).len()
    );

    // Transient list errors during a relist are retried.
    watch_established(&s, 5).await;
    let lists_before = s.count_calls("list", "volumeattachments");
    let hang = s.hang("watch", "volumeattachments");
    s.drop_watches();
    assert!(
        s.wait_for_calls("watch", "volumeattachments", 6, DEADLINE)
            .await
    );
    s.create("volumeattachments", va("va-after-errors"))
        .unwrap();
    s.compact_history();
    s.fail_times("list", "volumeattachments", 500, 2);
    s.remove_fault(hang);
    eventually("recovery after list errors", || has("va-after-errors")).await;
    let relists: Vec<Option<u16>> = s.calls_matching("list", "volumeattachments")[lists_before..]
        .iter()
        .map(|c| c.status)
        .collect();
    assert_eq!(relists[..3], [Some(500), Some(500), Some(200)]);
    task.abort();
}

#[tokio::test]
async fn kube_watcher_with_streaming_lists() {
    let s = FakeApiServer::start().await;
    for i in 0..120 {
        s.create("volumeattachments", va(&format!("va-{i:03}")))
            .unwrap();
    }
    let (client, _dir) = kube_client(&s).await;
    let api: Api<VolumeAttachment> = Api::all(client);
    let (reader, writer) = reflector::store::<VolumeAttachment>();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().streaming_lists()),
    )
    .default_backoff()
    .applied_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    tokio::time::timeout(DEADLINE, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.state().len(), 120);
    assert_eq!(
        s.count_calls("list", "*"),
        0,
        "no list: the initial state came through the watch"
    );
    let w = &s.calls_matching("watch", "volumeattachments")[0];
    assert_eq!(w.params()["sendInitialEvents"], "true");
    s.delete("volumeattachments", None, "va-000").unwrap();
    eventually("the delete", || reader.state().len() == 119).await;
    task.abort();
}
