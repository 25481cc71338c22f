//! A fake Kubernetes API server for tests: an in-memory store behind the real REST paths, with
//! watches, pagination, optimistic concurrency, finalizers, a call log and fault injection.
//!
//! Include it with `#[path = "support/fake_apiserver.rs"] mod fake_apiserver;` (adjust the path).
//!
//! It serves plain HTTP/1.1 on 127.0.0.1 and speaks JSON only. Resources served:
//!
//! | resource | group/version | scope | status subresource |
//! | --- | --- | --- | --- |
//! | `volumeattachments` | `storage.k8s.io/v1` | cluster | yes |
//! | `persistentvolumes` | `v1` | cluster | yes |
//! | `nodes` | `v1` | cluster | yes |
//! | `persistentvolumeclaims` | `v1` | namespaced | yes |
//! | `events` | `v1` | namespaced | no |
//! | `events` | `events.k8s.io/v1` | namespaced | no |
//! | `leases` | `coordination.k8s.io/v1` | namespaced | no |
//!
//! Everything is kept as `serde_json::Value`; one global resourceVersion counts every write, as
//! etcd's revision does. Resources are named in the helpers by plural, optionally qualified by
//! group (`"events.events.k8s.io"`), or by kind (`"VolumeAttachment"`).
//!
//! Two ways in, kept apart on purpose:
//! - **REST requests** are authenticated by bearer token and authorized by RBAC (module
//!   [`rbac`]: the chart's rendered roles by default) before anything else, and go through the
//!   real server's create and update strategies: the server sets uid, creationTimestamp and
//!   resourceVersion, and no request can set or change them.
//! - **The harness helpers** (`create`, `patch`, `delete`, ...) write the store directly, as
//!   etcd's contents before a test: no authorization, no call log, and `create` keeps a given
//!   status, uid and creationTimestamp (an object made minutes ago).

#![allow(dead_code)]

#[path = "fake_rbac.rs"]
pub mod rbac;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use rbac::{Attributes, Identity, Policy};

/// How many watch events are kept for watches that resume from a resourceVersion.
pub const DEFAULT_HISTORY_LIMIT: usize = 10_000;
/// How often a watch that asked for bookmarks gets one (the real server: about a minute).
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// The bearer token of [`Identity::Harness`], which [`FakeApiServer::kubeconfig`] carries.
pub const HARNESS_TOKEN: &str = "fake-harness";

// ---------------------------------------------------------------------------------------------
// Resource definitions
// ---------------------------------------------------------------------------------------------

/// One served resource.
#[derive(Debug)]
pub struct ResourceDef {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub has_status: bool,
    /// Field selector labels beyond `metadata.name`/`metadata.namespace`: (label, dotted JSON path).
    pub fields: &'static [(&'static str, &'static str)],
}

impl ResourceDef {
    /// `v1` or `group/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `persistentvolumes` or `volumeattachments.storage.k8s.io`, as error messages spell it.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `PersistentVolume` or `VolumeAttachment.storage.k8s.io`, as validation messages spell it.
    fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    fn collection_path(&self, namespace: Option<&str>) -> String {
        let base = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        match namespace {
            Some(ns) if self.namespaced => format!("{base}/namespaces/{ns}/{}", self.plural),
            _ => format!("{base}/{}", self.plural),
        }
    }
}

const CORE_EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject.kind", "involvedObject.kind"),
    ("involvedObject.namespace", "involvedObject.namespace"),
    ("involvedObject.name", "involvedObject.name"),
    ("involvedObject.uid", "involvedObject.uid"),
    ("involvedObject.apiVersion", "involvedObject.apiVersion"),
    (
        "involvedObject.resourceVersion",
        "involvedObject.resourceVersion",
    ),
    ("involvedObject.fieldPath", "involvedObject.fieldPath"),
    ("reason", "reason"),
    ("reportingComponent", "reportingComponent"),
    ("source", "source.component"),
    ("type", "type"),
];

const EVENTS_V1_FIELDS: &[(&str, &str)] = &[
    ("regarding.kind", "regarding.kind"),
    ("regarding.namespace", "regarding.namespace"),
    ("regarding.name", "regarding.name"),
    ("regarding.uid", "regarding.uid"),
    ("regarding.apiVersion", "regarding.apiVersion"),
    ("regarding.resourceVersion", "regarding.resourceVersion"),
    ("regarding.fieldPath", "regarding.fieldPath"),
    ("reason", "reason"),
    ("reportingController", "reportingController"),
    ("deprecatedSource", "deprecatedSource.component"),
    ("type", "type"),
];

/// Every resource this server knows, in a fixed order (the index is the store's type id).
pub static RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "storage.k8s.io",
        version: "v1",
        plural: "volumeattachments",
        singular: "volumeattachment",
        kind: "VolumeAttachment",
        namespaced: false,
        has_status: true,
        fields: &[],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "persistentvolumes",
        singular: "persistentvolume",
        kind: "PersistentVolume",
        namespaced: false,
        has_status: true,
        fields: &[],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        has_status: true,
        fields: &[("spec.unschedulable", "spec.unschedulable")],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "persistentvolumeclaims",
        singular: "persistentvolumeclaim",
        kind: "PersistentVolumeClaim",
        namespaced: true,
        has_status: true,
        fields: &[],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        has_status: false,
        fields: CORE_EVENT_FIELDS,
    },
    ResourceDef {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        has_status: false,
        fields: EVENTS_V1_FIELDS,
    },
    ResourceDef {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        has_status: false,
        fields: &[],
    },
];

/// The type id of a resource named by plural (`"nodes"`), plural.group
/// (`"events.events.k8s.io"`, `"volumeattachments.storage.k8s.io"`) or kind (`"Node"`).
/// A bare `"events"` is the core v1 one. Panics on an unknown name: a test's mistake.
pub fn resource_id(name: &str) -> usize {
    try_resource_id(name).unwrap_or_else(|| panic!("fake apiserver: unknown resource {name:?}"))
}

fn try_resource_id(name: &str) -> Option<usize> {
    if let Some(i) = RESOURCES.iter().position(|d| d.plural == name) {
        return Some(i);
    }
    if let Some(i) = RESOURCES.iter().position(|d| d.qualified() == name) {
        return Some(i);
    }
    RESOURCES
        .iter()
        .position(|d| d.kind.eq_ignore_ascii_case(name) || d.qualified_kind() == name)
}

fn find_resource(group: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|d| d.group == group && d.plural == plural)
}

// ---------------------------------------------------------------------------------------------
// Errors (metav1.Status)
// ---------------------------------------------------------------------------------------------

/// An API error, served as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    pub details: Option<Value>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The `reason` the real server gives with an HTTP status.
pub fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

impl ApiError {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason: reason_for(code).to_string(),
            message: message.into(),
            details: None,
        }
    }

    fn with_reason(mut self, reason: &str) -> Self {
        self.reason = reason.to_string();
        self
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    fn not_found(def: &ResourceDef, name: &str) -> Self {
        Self::new(404, format!("{} \"{name}\" not found", def.qualified()))
            .with_details(json!({"name": name, "group": def.group, "kind": def.plural}))
    }

    fn already_exists(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            409,
            format!("{} \"{name}\" already exists", def.qualified()),
        )
        .with_reason("AlreadyExists")
        .with_details(json!({"name": name, "group": def.group, "kind": def.plural}))
    }

    fn conflict(def: &ResourceDef, name: &str, why: &str) -> Self {
        Self::new(
            409,
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                def.qualified()
            ),
        )
        .with_details(json!({"name": name, "group": def.group, "kind": def.plural}))
    }

    fn modified(def: &ResourceDef, name: &str) -> Self {
        Self::conflict(
            def,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    fn invalid(def: &ResourceDef, name: &str, cause: &str) -> Self {
        Self::new(
            422,
            format!("{} \"{name}\" is invalid: {cause}", def.qualified_kind()),
        )
        .with_details(json!({"name": name, "group": def.group, "kind": def.kind}))
    }

    fn resource_not_found() -> Self {
        Self::new(404, "the server could not find the requested resource").with_details(json!({}))
    }

    fn method_not_allowed(method: &Method) -> Self {
        Self::new(
            405,
            format!("the server does not allow this method on the requested resource ({method})"),
        )
        .with_details(json!({}))
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        });
        // `reason` is omitted when empty (metav1.Status `omitempty`).
        if !self.reason.is_empty() {
            s["reason"] = json!(self.reason);
        }
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Small utilities: time, ids, base64, query strings, JSON paths
// ---------------------------------------------------------------------------------------------

/// Now as RFC 3339 with second precision, as `metav1.Time` serializes.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

fn new_uid() -> String {
    let a = random_u64();
    let b = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        (a & 0xfff) as u16,
        (((b >> 48) as u16) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn generate_suffix() -> String {
    // The alphabet apimachinery's rand.String uses (no vowels, no confusable digits).
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut r = random_u64();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(r % ALPHABET.len() as u64) as usize] as char;
            r /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' {
            out.push(b' ');
        } else if b == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(b),
            }
        } else {
            out.push(b);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a query string; the last value of a repeated key wins.
fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn parse_bool(v: Option<&String>) -> bool {
    matches!(
        v.map(|s| s.as_str()),
        Some("true") | Some("1") | Some("True") | Some("TRUE")
    )
}

/// The value at a dotted path, as a field selector compares it (missing: empty string).
fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(field)).and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

fn finalizers(obj: &Value) -> Vec<String> {
    meta(obj)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn resource_version_of(obj: &Value) -> u64 {
    meta_str(obj, "resourceVersion")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Drops empty collections the real server would not serialize (`omitempty`).
fn normalize_meta(obj: &mut Value) {
    let m = meta_mut(obj);
    for key in [
        "finalizers",
        "labels",
        "annotations",
        "ownerReferences",
        "managedFields",
    ] {
        let empty = match m.get(key) {
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(Value::Null) => true,
            _ => false,
        };
        if empty {
            m.remove(key);
        }
    }
    for key in [
        "generateName",
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "namespace",
    ] {
        if matches!(m.get(key), Some(Value::Null)) || m.get(key).and_then(Value::as_str) == Some("")
        {
            m.remove(key);
        }
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Strategic merge patch
// ---------------------------------------------------------------------------------------------

/// How a list field of a built-in type merges in a strategic merge patch (its Go struct tags
/// `patchStrategy:"merge"` and `patchMergeKey`). Lists not named here are replaced whole, as in
/// a JSON merge patch.
fn smp_list_meta(plural: &str, path: &[&str]) -> Option<Option<&'static str>> {
    match (plural, path) {
        (_, ["metadata", "finalizers"]) => Some(None),
        (_, ["metadata", "ownerReferences"]) => Some(Some("uid")),
        ("nodes", ["spec", "podCIDRs"]) => Some(None),
        ("nodes", ["status", "conditions"] | ["status", "addresses"]) => Some(Some("type")),
        ("persistentvolumeclaims", ["status", "conditions"]) => Some(Some("type")),
        _ => None,
    }
}

/// A strategic merge patch error, mapped to the status the real server answers with.
fn smp_error(code: u16, message: impl Into<String>) -> ApiError {
    let e = ApiError::new(code, message);
    // Errors apimachinery does not turn into a Status are served as 500 with no reason.
    if code == 500 {
        e.with_reason("")
    } else {
        e
    }
}

fn smp_bad_format(what: &str) -> ApiError {
    smp_error(400, format!("invalid patch format of {what}"))
}

/// What a value decodes to in a typed object: directive keys and nulls are dropped.
fn smp_clean(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, v)| !k.starts_with('$') && !v.is_null())
                .map(|(k, v)| (k.clone(), smp_clean(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(smp_clean).collect()),
        other => other.clone(),
    }
}

/// Applies a strategic merge patch to `target`, an object of resource `plural`, as
/// apimachinery's `StrategicMergeMapPatch` does for built-in types: maps merge, lists with a
/// merge strategy merge (primitives as a set, objects by their merge key), other lists are
/// replaced, `null` deletes; the directives `$patch` (replace, delete), `$retainKeys`,
/// `$deleteFromPrimitiveList/<field>` and `$setElementOrder/<field>` are honoured.
pub fn strategic_merge_patch(
    plural: &str,
    target: &mut Value,
    patch: &Value,
) -> Result<(), ApiError> {
    let Value::Object(patch) = patch else {
        return Err(ApiError::bad_request(
            "a strategic merge patch must be a JSON object",
        ));
    };
    let original = match target.take() {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let merged = smp_map(plural, &mut Vec::new(), original, patch.clone())?;
    *target = smp_clean(&Value::Object(merged));
    Ok(())
}

fn smp_map(
    plural: &str,
    path: &mut Vec<String>,
    mut original: Map<String, Value>,
    mut patch: Map<String, Value>,
) -> Result<Map<String, Value>, ApiError> {
    if let Some(directive) = patch.get("$patch") {
        return match directive.as_str() {
            Some("replace") => {
                patch.remove("$patch");
                Ok(patch)
            }
            Some("delete") => Ok(Map::new()),
            _ => Err(smp_error(
                500,
                format!(
                    "Unknown patch type: {directive} in map: {}",
                    Value::Object(patch.clone())
                ),
            )),
        };
    }
    if let Some(retain) = patch.remove("$retainKeys") {
        let keys: Vec<&str> = retain
            .as_array()
            .ok_or_else(|| smp_bad_format("retainKeys"))?
            .iter()
            .map(|k| k.as_str().ok_or_else(|| smp_bad_format("retainKeys")))
            .collect::<Result<_, _>>()?;
        for (k, v) in &patch {
            let directive =
                k.starts_with("$deleteFromPrimitiveList/") || k.starts_with("$setElementOrder/");
            if !v.is_null() && !directive && !keys.contains(&k.as_str()) {
                return Err(smp_bad_format("retainKeys"));
            }
        }
        original.retain(|k, _| keys.contains(&k.as_str()));
    }
    let orders: Vec<(String, Value)> = patch
        .iter()
        .filter(|(k, _)| k.starts_with("$setElementOrder/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, order) in orders {
        patch.remove(&key);
        let field = key
            .split_once('/')
            .map(|(_, f)| f.to_string())
            .filter(|f| !f.is_empty())
            .ok_or_else(|| smp_bad_format("setElementOrder list"))?;
        let Value::Array(order) = order else {
            return Err(smp_bad_format("setElementOrder list"));
        };
        path.push(field.clone());
        let meta = list_meta(plural, path);
        let original_list = match original.get(&field) {
            Some(Value::Array(a)) => Some(a.clone()),
            Some(_) => return Err(smp_error(500, format!("{field} is not a list"))),
            None => None,
        };
        let patch_list = match patch.remove(&field) {
            Some(Value::Array(a)) => Some(a),
            Some(_) => return Err(smp_error(500, format!("{field} is not a list"))),
            None => None,
        };
        let merge_key = meta.flatten();
        if let Some(p) = &patch_list {
            validate_set_order(p, &order, merge_key)?;
        }
        let merged = match (original_list.clone(), patch_list.clone()) {
            (Some(o), None) => o,
            (None, Some(p)) => p,
            (Some(o), Some(p)) => match meta {
                Some(key) => smp_slice(plural, path, o, p, key, false)?,
                None => p,
            },
            (None, None) => {
                path.pop();
                continue;
            }
        };
        let (in_order, server_only) = partition(&merged, &order, merge_key);
        let server_order = original_list.unwrap_or_default();
        let both = normalize_order(in_order, server_only, &order, &server_order, merge_key);
        original.insert(field, Value::Array(both));
        path.pop();
    }
    for (k, v) in patch {
        let (k, delete_list) = match k.strip_prefix("$deleteFromPrimitiveList/") {
            Some("") => return Err(smp_bad_format("primitive list")),
            Some(field) => (field.to_string(), true),
            None => (k, false),
        };
        if v.is_null() {
            original.remove(&k);
            continue;
        }
        let Some(current) = original.get_mut(&k) else {
            if !delete_list {
                original.insert(k, v);
            }
            continue;
        };
        path.push(k.clone());
        let merged = match (current.take(), v) {
            (Value::Object(o), Value::Object(p)) => Value::Object(smp_map(plural, path, o, p)?),
            (Value::Array(o), Value::Array(p)) => match list_meta(plural, path) {
                Some(key) => Value::Array(smp_slice(plural, path, o, p, key, delete_list)?),
                None => Value::Array(p),
            },
            (_, p) => p,
        };
        path.pop();
        original.insert(k, merged);
    }
    Ok(original)
}

fn list_meta(plural: &str, path: &[String]) -> Option<Option<&'static str>> {
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    smp_list_meta(plural, &parts)
}

/// JSON type of a list element, for apimachinery's "identical element types" rule.
fn element_kind(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        Value::Array(_) => 4,
        Value::Object(_) => 5,
    }
}

fn smp_slice(
    plural: &str,
    path: &mut Vec<String>,
    original: Vec<Value>,
    patch: Vec<Value>,
    merge_key: Option<&str>,
    delete_list: bool,
) -> Result<Vec<Value>, ApiError> {
    if original.is_empty() && patch.is_empty() {
        return Ok(original);
    }
    let mut kinds = original.iter().chain(&patch).map(element_kind);
    let kind = kinds.next().unwrap_or(0);
    if kind == 4 {
        return Err(smp_error(422, "lists of lists are not supported"));
    }
    if kinds.any(|k| k != kind) {
        return Err(smp_error(500, "list element types are not identical"));
    }
    if kind != 5 {
        if delete_list {
            return Ok(original
                .into_iter()
                .filter(|v| !patch.contains(v))
                .collect());
        }
        let merged = dedup_scalars(original.iter().chain(&patch).cloned().collect());
        let (in_patch, server_only) = partition(&merged, &patch, None);
        return Ok(normalize_order(
            in_patch,
            server_only,
            &patch,
            &original,
            None,
        ));
    }
    let Some(key) = merge_key else {
        return Err(smp_error(
            500,
            "cannot merge lists without merge key for type map",
        ));
    };
    // Special elements first: `$patch: delete` removes by key, `$patch: replace` replaces.
    let mut original = original;
    let mut plain = Vec::new();
    let mut replace = false;
    for item in patch {
        let m = item.as_object().expect("all elements are maps");
        match m.get("$patch") {
            None => plain.push(item),
            Some(d) if d == "delete" => {
                let value = m.get(key).ok_or_else(|| no_merge_key(&item, key))?;
                original.retain(|o| o.get(key) != Some(value));
            }
            Some(d) if d == "replace" => replace = true,
            Some(d) if d == "merge" => {
                return Err(smp_error(
                    500,
                    "merging lists cannot yet be specified in the patch",
                ))
            }
            Some(d) => {
                return Err(smp_error(
                    500,
                    format!("Unknown patch type: {d} in map: {item}"),
                ))
            }
        }
    }
    let (mut merged, patch) = if replace {
        (plain, Vec::new())
    } else {
        (original.clone(), plain)
    };
    let server_order = if replace { Vec::new() } else { original };
    for item in &patch {
        let value = item.get(key).ok_or_else(|| no_merge_key(item, key))?;
        match merged.iter().position(|o| o.get(key) == Some(value)) {
            Some(i) => {
                let o = match merged[i].take() {
                    Value::Object(o) => o,
                    _ => Map::new(),
                };
                let p = item.as_object().cloned().unwrap_or_default();
                merged[i] = Value::Object(smp_map(plural, path, o, p)?);
            }
            None => merged.push(item.clone()),
        }
    }
    let server_order = if replace {
        merged.clone()
    } else {
        server_order
    };
    let (in_patch, server_only) = partition(&merged, &patch, Some(key));
    Ok(normalize_order(
        in_patch,
        server_only,
        &patch,
        &server_order,
        Some(key),
    ))
}

fn no_merge_key(item: &Value, key: &str) -> ApiError {
    smp_error(
        500,
        format!("map: {item} does not contain declared merge key: {key}"),
    )
}

/// apimachinery's `deduplicateScalars`: a later duplicate is overwritten by the last element.
fn dedup_scalars(mut s: Vec<Value>) -> Vec<Value> {
    let mut i = 0;
    while i < s.len() {
        let mut j = i + 1;
        while j < s.len() {
            if s[i] == s[j] {
                let last = s.pop().expect("non-empty");
                if j < s.len() {
                    s[j] = last;
                }
            } else {
                j += 1;
            }
        }
        i += 1;
    }
    s
}

/// The merge-key value of a map element, or the element itself.
fn order_key<'a>(v: &'a Value, key: Option<&str>) -> Option<&'a Value> {
    match key {
        Some(k) => v.get(k),
        None => Some(v),
    }
}

fn index_in(list: &[Value], v: &Value, key: Option<&str>) -> Option<usize> {
    let want = order_key(v, key)?;
    list.iter().position(|x| order_key(x, key) == Some(want))
}

/// Splits `items` into those present in `by` and the rest, keeping their order.
fn partition(items: &[Value], by: &[Value], key: Option<&str>) -> (Vec<Value>, Vec<Value>) {
    items
        .iter()
        .cloned()
        .partition(|v| index_in(by, v, key).is_some())
}

/// apimachinery's `normalizeSliceOrder`: Go's stable sort (an insertion sort for short lists)
/// with its comparator, under which an element missing from `order` sorts before anything.
/// `$patch: delete` elements go last.
fn sort_by_order(items: Vec<Value>, order: &[Value], key: Option<&str>) -> Vec<Value> {
    let (mut keep, deletes): (Vec<Value>, Vec<Value>) = items
        .into_iter()
        .partition(|v| !(key.is_some() && v.get("$patch").is_some_and(|d| d == "delete")));
    let less = |a: &Value, b: &Value| match (index_in(order, a, key), index_in(order, b, key)) {
        (Some(i), Some(j)) => i < j,
        _ => true,
    };
    for i in 1..keep.len() {
        let mut j = i;
        while j > 0 && less(&keep[j], &keep[j - 1]) {
            keep.swap(j, j - 1);
            j -= 1;
        }
    }
    keep.extend(deletes);
    keep
}

/// apimachinery's `normalizeElementOrder`: patch items in patch order, server-only items in
/// server order, interleaved by their places in the server's list.
fn normalize_order(
    patch_items: Vec<Value>,
    server_only: Vec<Value>,
    patch_order: &[Value],
    server_order: &[Value],
    key: Option<&str>,
) -> Vec<Value> {
    let right = sort_by_order(patch_items, patch_order, key);
    let left = sort_by_order(server_only, server_order, key);
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(left.len() + right.len());
    while i < left.len() || j < right.len() {
        let take_left = if i >= left.len() {
            false
        } else if j >= right.len() {
            true
        } else {
            matches!(
                (index_in(server_order, &left[i], key), index_in(server_order, &right[j], key)),
                (Some(l), Some(r)) if l < r
            )
        };
        if take_left {
            out.push(left[i].clone());
            i += 1;
        } else {
            out.push(right[j].clone());
            j += 1;
        }
    }
    out
}

/// apimachinery's `validatePatchWithSetOrderList`: the patch's items appear in the
/// `$setElementOrder` list, in the same relative order.
fn validate_set_order(patch: &[Value], order: &[Value], key: Option<&str>) -> Result<(), ApiError> {
    if order.is_empty() || patch.is_empty() {
        return Ok(());
    }
    let items: Vec<&Value> = patch.iter().filter(|v| v.get("$patch").is_none()).collect();
    let (mut p, mut o) = (0, 0);
    while p < items.len() && o < order.len() {
        if order_key(items[p], key).is_some()
            && order_key(items[p], key) == order_key(&order[o], key)
        {
            p += 1;
        }
        o += 1;
    }
    if p < items.len() {
        return Err(smp_error(
            500,
            format!(
                "The order in patch list:\n{}\n doesn't match $setElementOrder list:\n{}\n",
                Value::Array(patch.to_vec()),
                Value::Array(order.to_vec())
            ),
        ));
    }
    Ok(())
}

fn pointer_parts(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(vec![]);
    }
    if !path.starts_with('/') {
        return Err(format!("invalid JSON pointer {path:?}"));
    }
    Ok(path[1..]
        .split('/')
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn pointer_parent<'a>(doc: &'a mut Value, parts: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for p in parts {
        cur = match cur {
            Value::Object(o) => o
                .get_mut(p)
                .ok_or_else(|| format!("missing path element {p:?}"))?,
            Value::Array(a) => {
                let i: usize = p.parse().map_err(|_| format!("bad array index {p:?}"))?;
                a.get_mut(i)
                    .ok_or_else(|| format!("array index {i} out of range"))?
            }
            _ => return Err(format!("cannot descend into {p:?}")),
        };
    }
    Ok(cur)
}

fn json_patch_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let parts = pointer_parts(path)?;
    let (last, parent) = parts
        .split_last()
        .ok_or("cannot remove the whole document")?;
    match pointer_parent(doc, parent)? {
        Value::Object(o) => o
            .remove(last)
            .ok_or_else(|| format!("missing key {last:?}")),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("bad array index {last:?}"))?;
            if i >= a.len() {
                return Err(format!("array index {i} out of range"));
            }
            Ok(a.remove(i))
        }
        _ => Err("cannot remove from a scalar".into()),
    }
}

fn json_patch_add(doc: &mut Value, path: &str, value: Value, replace: bool) -> Result<(), String> {
    let parts = pointer_parts(path)?;
    let Some((last, parent)) = parts.split_last() else {
        *doc = value;
        return Ok(());
    };
    match pointer_parent(doc, parent)? {
        Value::Object(o) => {
            if replace && !o.contains_key(last) {
                return Err(format!("missing key {last:?}"));
            }
            o.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" && !replace {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("bad array index {last:?}"))?;
            if replace {
                let slot = a
                    .get_mut(i)
                    .ok_or_else(|| format!("array index {i} out of range"))?;
                *slot = value;
            } else {
                if i > a.len() {
                    return Err(format!("array index {i} out of range"));
                }
                a.insert(i, value);
            }
            Ok(())
        }
        _ => Err("cannot add to a scalar".into()),
    }
}

/// RFC 6902 JSON patch.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch is an array of operations")?;
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("operation without \"op\"")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("operation without \"path\"")?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("{kind} without \"value\""))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{kind} without \"from\""))
        };
        match kind {
            "add" => json_patch_add(doc, path, value()?, false)?,
            "replace" => json_patch_add(doc, path, value()?, true)?,
            "remove" => {
                json_patch_remove(doc, path)?;
            }
            "move" => {
                let v = json_patch_remove(doc, from()?)?;
                json_patch_add(doc, path, v, false)?;
            }
            "copy" => {
                let v = doc
                    .pointer(from()?)
                    .cloned()
                    .ok_or("copy from a missing path")?;
                json_patch_add(doc, path, v, false)?;
            }
            "test" => {
                let want = value()?;
                if doc.pointer(path) != Some(&want) {
                    return Err(format!("test failed at {path}"));
                }
            }
            other => return Err(format!("unknown operation {other:?}")),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c)
            }
            ')' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, ApiError> {
    let bad = |t: &str| ApiError::bad_request(format!("unable to parse requirement: found '{t}'"));
    let mut reqs = vec![];
    for term in split_top_level(s) {
        let req = if let Some(k) = term.strip_prefix('!') {
            LabelReq::NotExists(k.trim().to_string())
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelReq::NotEq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==") {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once('=') {
            LabelReq::Eq(k.trim().into(), v.trim().into())
        } else if let Some(open) = term.find('(') {
            let close = term
                .rfind(')')
                .filter(|&c| c > open)
                .ok_or_else(|| bad(&term))?;
            let head: Vec<&str> = term[..open].split_whitespace().collect();
            let values: Vec<String> = term[open + 1..close]
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            match head.as_slice() {
                [k, "in"] => LabelReq::In(k.to_string(), values),
                [k, "notin"] => LabelReq::NotIn(k.to_string(), values),
                _ => return Err(bad(&term)),
            }
        } else if term.contains(['<', '>', ' ']) {
            return Err(bad(&term));
        } else {
            LabelReq::Exists(term.clone())
        };
        let key = match &req {
            LabelReq::Eq(k, _)
            | LabelReq::NotEq(k, _)
            | LabelReq::In(k, _)
            | LabelReq::NotIn(k, _)
            | LabelReq::Exists(k)
            | LabelReq::NotExists(k) => k,
        };
        if key.is_empty() {
            return Err(bad(&term));
        }
        reqs.push(req);
    }
    Ok(reqs)
}

impl LabelReq {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        match self {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        }
    }
}

#[derive(Debug, Clone)]
struct FieldReq {
    path: String,
    value: String,
    negate: bool,
}

fn parse_field_selector(def: &ResourceDef, s: &str) -> Result<Vec<FieldReq>, ApiError> {
    let mut reqs = vec![];
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (label, value, negate) = if let Some((k, v)) = term.split_once("!=") {
            (k, v, true)
        } else if let Some((k, v)) = term.split_once("==") {
            (k, v, false)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, v, false)
        } else {
            return Err(ApiError::bad_request(format!(
                "invalid selector: '{s}'; can't understand '{term}'"
            )));
        };
        let label = label.trim();
        let path = match label {
            "metadata.name" | "metadata.namespace" => label,
            _ => def
                .fields
                .iter()
                .find(|(l, _)| *l == label)
                .map(|(_, p)| *p)
                .ok_or_else(|| {
                    ApiError::bad_request(format!("field label not supported: {label}"))
                })?,
        };
        reqs.push(FieldReq {
            path: path.to_string(),
            value: value.trim().to_string(),
            negate,
        });
    }
    Ok(reqs)
}

/// What a list or watch selects.
#[derive(Debug, Clone, Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn from_query(
        def: &ResourceDef,
        namespace: Option<&str>,
        q: &HashMap<String, String>,
    ) -> Result<Self, ApiError> {
        Ok(Filter {
            namespace: namespace.map(String::from),
            labels: match q.get("labelSelector") {
                Some(s) => parse_label_selector(s)?,
                None => vec![],
            },
            fields: match q.get("fieldSelector") {
                Some(s) => parse_field_selector(def, s)?,
                None => vec![],
            },
        })
    }

    fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }

    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if meta_str(obj, "namespace").unwrap_or("") != ns {
                return false;
            }
        }
        let labels = meta(obj)
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        self.labels.iter().all(|r| r.matches(labels))
            && self
                .fields
                .iter()
                .all(|f| (field_value(obj, &f.path) == f.value) != f.negate)
    }
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EvKind {
    Added,
    Modified,
    Deleted,
}

impl EvKind {
    fn as_str(self) -> &'static str {
        match self {
            EvKind::Added => "ADDED",
            EvKind::Modified => "MODIFIED",
            EvKind::Deleted => "DELETED",
        }
    }
}

#[derive(Debug, Clone)]
struct HistEntry {
    rv: u64,
    ty: usize,
    key: String,
    kind: EvKind,
    /// The new state (for DELETED: the last state, carrying the deletion's resourceVersion).
    object: Value,
    /// The state before this event (None for ADDED).
    prev: Option<Value>,
}

impl HistEntry {
    /// The event a watch with `filter` sees for this change, if any: an object entering the
    /// selection is ADDED, one leaving it is DELETED, as the real server does.
    fn event_for(&self, filter: &Filter) -> Option<(EvKind, &Value)> {
        match self.kind {
            EvKind::Added => filter
                .matches(&self.object)
                .then_some((EvKind::Added, &self.object)),
            EvKind::Deleted => filter
                .matches(&self.object)
                .then_some((EvKind::Deleted, &self.object)),
            EvKind::Modified => {
                let was = self.prev.as_ref().is_some_and(|p| filter.matches(p));
                let is = filter.matches(&self.object);
                match (was, is) {
                    (true, true) => Some((EvKind::Modified, &self.object)),
                    (false, true) => Some((EvKind::Added, &self.object)),
                    (true, false) => Some((EvKind::Deleted, &self.object)),
                    (false, false) => None,
                }
            }
        }
    }
}

fn watch_line(kind: &str, object: &Value) -> String {
    let mut s =
        serde_json::to_string(&json!({"type": kind, "object": object})).expect("serializable");
    s.push('\n');
    s
}

struct WatchReg {
    id: u64,
    ty: usize,
    filter: Filter,
    tx: mpsc::UnboundedSender<String>,
}

/// What deleting an object did.
#[derive(Debug, Clone, PartialEq)]
pub enum DeleteOutcome {
    /// It has finalizers: `deletionTimestamp` is set and it stays until they are removed.
    Pending(Value),
    /// It is gone; this is its last state.
    Deleted(Value),
}

struct Store {
    rv: u64,
    objects: Vec<BTreeMap<String, Value>>,
    history: VecDeque<HistEntry>,
    history_limit: usize,
    /// Events with a resourceVersion at or below this are forgotten.
    compacted_rv: u64,
    /// Per resource type, the resourceVersion of its last write (0: never written).
    written: Vec<u64>,
    watchers: Vec<WatchReg>,
    next_watch_id: u64,
}

fn object_key(def: &ResourceDef, namespace: Option<&str>, name: &str) -> String {
    if def.namespaced {
        format!("{}/{name}", namespace.unwrap_or(""))
    } else {
        name.to_string()
    }
}

/// Where the real server keeps an object in etcd (as its storage errors name it).
fn storage_key(def: &ResourceDef, namespace: Option<&str>, name: &str) -> String {
    // Nodes are still stored under their old name.
    let resource = if def.plural == "nodes" {
        "minions"
    } else {
        def.plural
    };
    match namespace.filter(|_| def.namespaced) {
        Some(ns) => format!("/registry/{resource}/{ns}/{name}"),
        None => format!("/registry/{resource}/{name}"),
    }
}

/// The namespace rule every Event must pass, create or update (Kubernetes'
/// `legacyValidateEvent`): without `eventTime` (an old-style event), the event lives in the
/// namespace of the object it is about, or in `default` (or no namespace) when that object is
/// cluster-scoped; with `eventTime`, an event about a cluster-scoped object lives in `default`
/// or `kube-system`. The real server answers 422 otherwise.
fn validate_event(def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
    if def.plural != "events" {
        return Ok(());
    }
    let about = if def.group.is_empty() {
        "involvedObject"
    } else {
        "regarding"
    };
    let namespace = meta_str(obj, "namespace").unwrap_or("");
    let object_ns = obj
        .get(about)
        .and_then(|o| o.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let event_time = obj
        .get("eventTime")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty());
    let ok = match (event_time, object_ns.is_empty()) {
        (false, true) => namespace.is_empty() || namespace == "default",
        (false, false) => namespace == object_ns,
        (true, true) => namespace == "default" || namespace == "kube-system",
        (true, false) => true,
    };
    if ok {
        return Ok(());
    }
    Err(ApiError::invalid(
        def,
        meta_str(obj, "name").unwrap_or(""),
        &format!(
            "{about}.namespace: Invalid value: {}: does not match event.namespace",
            json!(object_ns)
        ),
    ))
}

/// Parsed list/watch/get paging and version parameters.
struct ListOpts {
    limit: Option<usize>,
    continue_token: Option<String>,
    resource_version: Option<String>,
    version_match: Option<String>,
}

impl ListOpts {
    fn from_query(q: &HashMap<String, String>) -> Result<Self, ApiError> {
        let limit = match q.get("limit").map(|s| s.as_str()) {
            None | Some("") => None,
            Some(s) => match s.parse::<i64>() {
                Ok(n) if n > 0 => Some(n as usize),
                Ok(_) => None,
                Err(_) => return Err(ApiError::bad_request(format!("invalid limit: {s:?}"))),
            },
        };
        Ok(ListOpts {
            limit,
            continue_token: q.get("continue").filter(|s| !s.is_empty()).cloned(),
            resource_version: q.get("resourceVersion").filter(|s| !s.is_empty()).cloned(),
            version_match: q
                .get("resourceVersionMatch")
                .filter(|s| !s.is_empty())
                .cloned(),
        })
    }
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}")))
}

fn encode_continue(rv: u64, last_key: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last_key}\u{0}")});
    b64_encode(token.to_string().as_bytes())
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let bytes = b64_decode(token).ok_or_else(bad)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if v.get("v").and_then(Value::as_str) != Some("meta.k8s.io/v1") {
        return Err(bad());
    }
    let rv = v
        .get("rv")
        .and_then(Value::as_u64)
        .filter(|&rv| rv > 0)
        .ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    Ok((rv, start.to_string()))
}

/// Who writes an object into the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A REST request: the server sets the system fields (uid, creationTimestamp,
    /// resourceVersion) and applies the create strategy.
    Request,
    /// The harness, seeding state that exists before the test: stored as given.
    Seed,
}

fn strip_type_meta(mut obj: Value) -> Value {
    if let Some(o) = obj.as_object_mut() {
        o.remove("apiVersion");
        o.remove("kind");
    }
    obj
}

impl Store {
    fn new() -> Self {
        Store {
            rv: 0,
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            history: VecDeque::new(),
            history_limit: DEFAULT_HISTORY_LIMIT,
            compacted_rv: 0,
            written: RESOURCES.iter().map(|_| 0).collect(),
            watchers: vec![],
            next_watch_id: 1,
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, ty: usize, key: String, kind: EvKind, object: Value, prev: Option<Value>) {
        self.written[ty] = self.rv;
        let entry = HistEntry {
            rv: resource_version_of(&object),
            ty,
            key,
            kind,
            object,
            prev,
        };
        self.watchers.retain(|w| {
            if w.ty != ty {
                return true;
            }
            match entry.event_for(&w.filter) {
                Some((k, obj)) => w.tx.send(watch_line(k.as_str(), obj)).is_ok(),
                None => !w.tx.is_closed(),
            }
        });
        self.history.push_back(entry);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = self.compacted_rv.max(old.rv);
            }
        }
    }

    /// Forgets all history: watches and continue tokens from before now get 410 Gone.
    fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
    }

    /// The objects of one type as they were at resourceVersion `at` (which must not be compacted).
    fn snapshot(&self, ty: usize, at: u64) -> std::borrow::Cow<'_, BTreeMap<String, Value>> {
        if !self.history.iter().any(|e| e.ty == ty && e.rv > at) {
            return std::borrow::Cow::Borrowed(&self.objects[ty]);
        }
        let mut view = self.objects[ty].clone();
        for e in self.history.iter().rev().take_while(|e| e.rv > at) {
            if e.ty != ty {
                continue;
            }
            match &e.prev {
                Some(p) => {
                    view.insert(e.key.clone(), p.clone());
                }
                None => {
                    view.remove(&e.key);
                }
            }
        }
        std::borrow::Cow::Owned(view)
    }

    fn get(&self, ty: usize, namespace: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let def = &RESOURCES[ty];
        self.objects[ty]
            .get(&object_key(def, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))
    }

    fn list(&self, ty: usize, filter: &Filter, opts: &ListOpts) -> Result<Value, ApiError> {
        let def = &RESOURCES[ty];
        if opts.version_match.is_some() && opts.resource_version.is_none() {
            return Err(ApiError::bad_request(
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if opts.continue_token.is_some() && opts.version_match.is_some() {
            return Err(ApiError::bad_request(
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        if opts.continue_token.is_some()
            && opts.resource_version.as_deref().is_some_and(|rv| rv != "0")
        {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let too_large = |rv: u64, cur: u64| {
            ApiError::new(504, format!("Too large resource version: {rv}, current: {cur}"))
                .with_details(json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}))
        };
        let (at, start) = if let Some(token) = &opts.continue_token {
            let (rv, start) = decode_continue(token)?;
            if rv < self.compacted_rv {
                return Err(ApiError::new(
                    410,
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            if rv > self.rv {
                return Err(ApiError::bad_request(format!(
                    "continue key is not valid: {token:?}"
                )));
            }
            (rv, Some(start))
        } else {
            match (
                opts.resource_version.as_deref(),
                opts.version_match.as_deref(),
            ) {
                (_, Some(m)) if m != "Exact" && m != "NotOlderThan" => {
                    return Err(ApiError::bad_request(format!(
                        "unsupported resourceVersionMatch: {m:?}"
                    )));
                }
                (Some("0"), Some("Exact")) => {
                    return Err(ApiError::bad_request(
                        "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                    ));
                }
                (Some(rv), Some("Exact")) => {
                    let rv = parse_rv(rv)?;
                    if rv > self.rv {
                        return Err(too_large(rv, self.rv));
                    }
                    if rv < self.compacted_rv {
                        return Err(ApiError::new(
                            410,
                            format!("too old resource version: {rv} ({})", self.compacted_rv),
                        ));
                    }
                    (rv, None)
                }
                (Some(rv), _) => {
                    let n = parse_rv(rv)?;
                    if n > self.rv {
                        return Err(too_large(n, self.rv));
                    }
                    (self.rv, None)
                }
                (None, _) => (self.rv, None),
            }
        };
        let view = self.snapshot(ty, at);
        let mut items = vec![];
        let mut last_key = None;
        let mut remaining = 0usize;
        let range = match &start {
            Some(s) => view.range::<String, _>(s.clone()..),
            None => view.range::<String, _>(..),
        };
        for (key, obj) in range {
            if !filter.matches(obj) {
                continue;
            }
            if opts.limit.is_some_and(|l| items.len() >= l) {
                remaining += 1;
                if filter.has_selectors() {
                    break;
                }
                continue;
            }
            items.push(strip_type_meta(obj.clone()));
            last_key = Some(key.clone());
        }
        let mut list_meta = json!({"resourceVersion": at.to_string()});
        if remaining > 0 {
            if let Some(last) = last_key {
                list_meta["continue"] = json!(encode_continue(at, &last));
                if !filter.has_selectors() {
                    list_meta["remainingItemCount"] = json!(remaining);
                }
            }
        }
        Ok(json!({
            "kind": format!("{}List", def.kind),
            "apiVersion": def.api_version(),
            "metadata": list_meta,
            "items": items,
        }))
    }

    fn check_type_meta(def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
        if let Some(k) = obj.get("kind").and_then(Value::as_str) {
            if !k.is_empty() && k != def.kind {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({}) does not match the expected API version ({})",
                    obj.get("apiVersion").and_then(Value::as_str).unwrap_or(""),
                    def.api_version()
                )));
            }
        }
        if let Some(av) = obj.get("apiVersion").and_then(Value::as_str) {
            if !av.is_empty() && av != def.api_version() {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({av}) does not match the expected API version ({})",
                    def.api_version()
                )));
            }
        }
        Ok(())
    }

    fn set_type_meta(def: &ResourceDef, obj: &mut Value) {
        obj["apiVersion"] = json!(def.api_version());
        obj["kind"] = json!(def.kind);
    }

    /// Creates an object. `namespace` is the request path's; for a seed it is the object's own.
    /// `origin` decides who sets the system fields: a [`Origin::Request`] gets the real server's
    /// create path (a set resourceVersion refused, uid and creationTimestamp the server's own,
    /// status reset by the create strategy); a [`Origin::Seed`] is stored as given.
    fn create(
        &mut self,
        ty: usize,
        namespace: Option<&str>,
        mut obj: Value,
        origin: Origin,
    ) -> Result<Value, ApiError> {
        let def = &RESOURCES[ty];
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        // The storage layer (etcd3 `Create`) refuses a set resourceVersion before anything is
        // written; the error is no API status, so the handler serves it as a bare 500.
        if origin == Origin::Request
            && meta_str(&obj, "resourceVersion").is_some_and(|rv| !rv.is_empty() && rv != "0")
        {
            return Err(ApiError::new(
                500,
                "resourceVersion should not be set on objects to be created",
            )
            .with_reason(""));
        }
        Self::check_type_meta(def, &obj)?;
        Self::set_type_meta(def, &mut obj);
        let m = meta_mut(&mut obj);
        if def.namespaced {
            let body_ns = m
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(String::from);
            let ns = match (namespace, body_ns) {
                (Some(p), Some(b)) if p != b => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                (Some(p), _) => p.to_string(),
                (None, Some(b)) => b,
                (None, None) => "default".to_string(),
            };
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        let mut name = m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            let prefix = m
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    def,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
            name = format!("{prefix}{}", generate_suffix());
            m.insert("name".into(), json!(name));
        }
        let ns = m.get("namespace").and_then(Value::as_str).map(String::from);
        // The server's own (apiserver `FillObjectMetaSystemFields`): whatever a request sent is
        // replaced. A seed keeps what the harness gave, as etcd holds it.
        let given = |m: &Map<String, Value>, key: &str| {
            origin == Origin::Seed
                && m.get(key)
                    .and_then(Value::as_str)
                    .is_some_and(|v| !v.is_empty())
        };
        if !given(m, "uid") {
            m.insert("uid".into(), json!(new_uid()));
        }
        if !given(m, "creationTimestamp") {
            m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        }
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("selfLink");
        validate_event(def, &obj)?;
        let key = object_key(def, ns.as_deref(), &name);
        if self.objects[ty].contains_key(&key) {
            return Err(ApiError::already_exists(def, &name));
        }
        if origin == Origin::Request {
            match def.plural {
                "volumeattachments" => obj["status"] = json!({"attached": false}),
                "persistentvolumes" | "persistentvolumeclaims" => {
                    obj["status"] = json!({"phase": "Pending"})
                }
                _ => {}
            }
        }
        normalize_meta(&mut obj);
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.objects[ty].insert(key.clone(), obj.clone());
        self.emit(ty, key, EvKind::Added, obj.clone(), None);
        Ok(obj)
    }

    /// Stores `new` as the next state of `old` (same key), with the real server's update
    /// strategy: server-managed metadata kept, status only through `/status` (and only status
    /// there), no-op updates write nothing, emptied finalizers finish a pending deletion.
    fn commit_update(
        &mut self,
        ty: usize,
        key: &str,
        old: Value,
        new: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let def = &RESOURCES[ty];
        let name = meta_str(&old, "name").unwrap_or("").to_string();
        let mut fin = if status_only {
            let mut f = old.clone();
            match new.get("status") {
                Some(s) => f["status"] = s.clone(),
                None => {
                    f.as_object_mut().expect("object").remove("status");
                }
            }
            f
        } else {
            let mut f = new;
            Self::set_type_meta(def, &mut f);
            let old_meta = meta(&old).cloned().unwrap_or_default();
            let m = meta_mut(&mut f);
            for key in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "name",
                "namespace",
            ] {
                match old_meta.get(key) {
                    Some(v) => m.insert(key.into(), v.clone()),
                    None => m.remove(key),
                };
            }
            m.remove("selfLink");
            if def.has_status {
                match old.get("status") {
                    Some(s) => f["status"] = s.clone(),
                    None => {
                        f.as_object_mut().expect("object").remove("status");
                    }
                }
            }
            if meta_str(&old, "deletionTimestamp").is_some() {
                let before = finalizers(&old);
                let added: Vec<String> = finalizers(&f)
                    .into_iter()
                    .filter(|x| !before.contains(x))
                    .collect();
                if !added.is_empty() {
                    return Err(ApiError::invalid(
                        def,
                        &name,
                        &format!(
                            "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                        ),
                    ));
                }
            }
            f
        };
        normalize_meta(&mut fin);
        validate_event(def, &fin)?;
        let mut cmp = fin.clone();
        meta_mut(&mut cmp).insert(
            "resourceVersion".into(),
            old["metadata"]["resourceVersion"].clone(),
        );
        if cmp == old {
            return Ok(old);
        }
        let rv = self.next_rv();
        meta_mut(&mut fin).insert("resourceVersion".into(), json!(rv.to_string()));
        if meta_str(&fin, "deletionTimestamp").is_some() && finalizers(&fin).is_empty() {
            self.objects[ty].remove(key);
            self.emit(ty, key.to_string(), EvKind::Deleted, fin.clone(), Some(old));
        } else {
            self.objects[ty].insert(key.to_string(), fin.clone());
            self.emit(
                ty,
                key.to_string(),
                EvKind::Modified,
                fin.clone(),
                Some(old),
            );
        }
        Ok(fin)
    }

    fn check_identity(
        def: &ResourceDef,
        namespace: Option<&str>,
        name: &str,
        obj: &Value,
    ) -> Result<(), ApiError> {
        if let Some(n) = meta_str(obj, "name").filter(|n| !n.is_empty()) {
            if n != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        if def.namespaced {
            if let (Some(b), Some(p)) = (
                meta_str(obj, "namespace").filter(|n| !n.is_empty()),
                namespace,
            ) {
                if b != p {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_precondition(
        def: &ResourceDef,
        name: &str,
        old: &Value,
        new: &Value,
    ) -> Result<(), ApiError> {
        match meta_str(new, "resourceVersion").filter(|s| !s.is_empty()) {
            Some(rv) if Some(rv) != meta_str(old, "resourceVersion") => {
                Err(ApiError::modified(def, name))
            }
            _ => Ok(()),
        }
    }

    fn update(
        &mut self,
        ty: usize,
        namespace: Option<&str>,
        name: &str,
        new: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let def = &RESOURCES[ty];
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        Self::check_type_meta(def, &new)?;
        Self::check_identity(def, namespace, name, &new)?;
        let key = object_key(def, namespace, name);
        let old = self.objects[ty]
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))?;
        // A uid in the body is a precondition (apiserver's `defaultUpdatedObjectInfo`), checked
        // by the storage layer before anything else: 409.
        if let Some(uid) = meta_str(&new, "uid").filter(|u| !u.is_empty()) {
            let have = meta_str(&old, "uid").unwrap_or("");
            if uid != have {
                return Err(ApiError::conflict(
                    def,
                    name,
                    &format!(
                        "StorageError: invalid object, Code: 4, Key: {}, ResourceVersion: 0, AdditionalErrorMsg: Precondition failed: UID in precondition: {uid}, UID in object meta: {have}",
                        storage_key(def, namespace, name)
                    ),
                ));
            }
        }
        Self::check_precondition(def, name, &old, &new)?;
        self.commit_update(ty, &key, old, new, status_only)
    }

    fn patch(
        &mut self,
        ty: usize,
        namespace: Option<&str>,
        name: &str,
        content_type: &str,
        patch: &Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let def = &RESOURCES[ty];
        let key = object_key(def, namespace, name);
        let old = self.objects[ty]
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))?;
        let mut new = old.clone();
        match content_type {
            "application/merge-patch+json" => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                merge_patch(&mut new, patch);
            }
            "application/strategic-merge-patch+json" => {
                strategic_merge_patch(def.plural, &mut new, patch)?
            }
            "application/json-patch+json" => json_patch(&mut new, patch).map_err(|e| {
                ApiError::new(
                    422,
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?,
            other => {
                return Err(ApiError::new(
                    415,
                    format!(
                        "the body of the request was in an unknown format ({other}) - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json"
                    ),
                ));
            }
        }
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the patched object is not a JSON object",
            ));
        }
        Self::check_identity(def, namespace, name, &new)?;
        // A patch carries no uid precondition: a patched uid reaches the update validation,
        // which refuses to change an immutable field.
        if let Some(uid) = meta_str(&new, "uid").filter(|u| !u.is_empty()) {
            if Some(uid) != meta_str(&old, "uid") {
                return Err(ApiError::invalid(
                    def,
                    name,
                    &format!(
                        "metadata.uid: Invalid value: {}: field is immutable",
                        json!(uid)
                    ),
                ));
            }
        }
        Self::check_precondition(def, name, &old, &new)?;
        self.commit_update(ty, &key, old, new, status_only)
    }

    fn delete(
        &mut self,
        ty: usize,
        namespace: Option<&str>,
        name: &str,
        options: Option<&Value>,
    ) -> Result<DeleteOutcome, ApiError> {
        let def = &RESOURCES[ty];
        let key = object_key(def, namespace, name);
        let old = self.objects[ty]
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))?;
        if let Some(pre) = options.and_then(|o| o.get("preconditions")) {
            if let Some(uid) = pre.get("uid").and_then(Value::as_str) {
                let have = meta_str(&old, "uid").unwrap_or("");
                if uid != have {
                    return Err(ApiError::conflict(
                        def,
                        name,
                        &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"),
                    ));
                }
            }
            if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str) {
                let have = meta_str(&old, "resourceVersion").unwrap_or("");
                if rv != have {
                    return Err(ApiError::conflict(
                        def,
                        name,
                        &format!(
                            "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {have}"
                        ),
                    ));
                }
            }
        }
        if !finalizers(&old).is_empty() {
            if meta_str(&old, "deletionTimestamp").is_some() {
                return Ok(DeleteOutcome::Pending(old));
            }
            let mut new = old.clone();
            let rv = self.next_rv();
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            m.insert("resourceVersion".into(), json!(rv.to_string()));
            self.objects[ty].insert(key.clone(), new.clone());
            self.emit(ty, key, EvKind::Modified, new.clone(), Some(old));
            return Ok(DeleteOutcome::Pending(new));
        }
        let mut gone = old.clone();
        let rv = self.next_rv();
        meta_mut(&mut gone).insert("resourceVersion".into(), json!(rv.to_string()));
        self.objects[ty].remove(&key);
        self.emit(ty, key, EvKind::Deleted, gone.clone(), Some(old));
        Ok(DeleteOutcome::Deleted(gone))
    }

    /// Removes an object and records its deletion in the history, without sending it to the
    /// watches open now.
    fn delete_unwatched(
        &mut self,
        ty: usize,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let def = &RESOURCES[ty];
        let key = object_key(def, namespace, name);
        let old = self.objects[ty]
            .remove(&key)
            .ok_or_else(|| ApiError::not_found(def, name))?;
        let mut gone = old.clone();
        let rv = self.next_rv();
        meta_mut(&mut gone).insert("resourceVersion".into(), json!(rv.to_string()));
        let watchers = std::mem::take(&mut self.watchers);
        self.emit(ty, key, EvKind::Deleted, gone.clone(), Some(old));
        self.watchers = watchers;
        Ok(gone)
    }

    /// Registers a watch and returns the lines to send first (and whether the watch ends there).
    fn start_watch(
        &mut self,
        ty: usize,
        filter: Filter,
        q: &HashMap<String, String>,
        drop_rx: watch::Receiver<u64>,
    ) -> Result<WatchStart, ApiError> {
        let def = &RESOURCES[ty];
        let rv = q.get("resourceVersion").filter(|s| !s.is_empty()).cloned();
        let version_match = q
            .get("resourceVersionMatch")
            .filter(|s| !s.is_empty())
            .cloned();
        let bookmarks = parse_bool(q.get("allowWatchBookmarks"));
        let send_initial = q.get("sendInitialEvents").map(|v| parse_bool(Some(v)));
        if send_initial.is_some() {
            if version_match.as_deref() != Some("NotOlderThan") {
                return Err(ApiError::invalid(
                    def,
                    "",
                    "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if send_initial == Some(true) && !bookmarks {
                return Err(ApiError::invalid(
                    def,
                    "",
                    "allowWatchBookmarks: Forbidden: allowWatchBookmarks must be set to true when sendInitialEvents is set",
                ));
            }
        } else if version_match.is_some() {
            return Err(ApiError::invalid(
                def,
                "",
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        let mut lines = vec![];
        let mut ended = false;
        let initial_state = send_initial == Some(true) || matches!(rv.as_deref(), None | Some("0"));
        if initial_state {
            for obj in self.objects[ty].values().filter(|o| filter.matches(o)) {
                lines.push(watch_line("ADDED", obj));
            }
            if send_initial == Some(true) {
                let bm = json!({
                    "kind": def.kind,
                    "apiVersion": def.api_version(),
                    "metadata": {
                        "resourceVersion": self.rv.to_string(),
                        "annotations": {"k8s.io/initial-events-end": "true"},
                    },
                });
                lines.push(watch_line("BOOKMARK", &bm));
            }
        } else {
            let from = parse_rv(rv.as_deref().unwrap_or("0"))?;
            if from < self.compacted_rv {
                let err = ApiError::new(
                    410,
                    format!("too old resource version: {from} ({})", self.compacted_rv),
                );
                lines.push(watch_line("ERROR", &err.to_status()));
                ended = true;
            } else {
                for e in self.history.iter().filter(|e| e.ty == ty && e.rv > from) {
                    if let Some((k, obj)) = e.event_for(&filter) {
                        lines.push(watch_line(k.as_str(), obj));
                    }
                }
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_watch_id;
        self.next_watch_id += 1;
        if !ended {
            self.watchers.push(WatchReg { id, ty, filter, tx });
        }
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&s| s > 0)
            .map(Duration::from_secs);
        Ok(WatchStart {
            id,
            drop_rx,
            ty,
            lines,
            ended,
            rx,
            bookmarks,
            timeout,
        })
    }
}

struct WatchStart {
    id: u64,
    /// Subscribed before the watch was registered, so no `drop_watches` after it is missed.
    drop_rx: watch::Receiver<u64>,
    ty: usize,
    lines: Vec<String>,
    ended: bool,
    rx: mpsc::UnboundedReceiver<String>,
    bookmarks: bool,
    timeout: Option<Duration>,
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

/// What a matching request gets.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultAction {
    /// Answer with this HTTP status (a `Status` body with the matching reason).
    Fail {
        status: u16,
        message: Option<String>,
    },
    /// Never answer, until the fault is removed or cleared (then the request proceeds).
    Hang,
    /// Answer late.
    Delay(Duration),
}

/// A fault for requests matching verb and resource.
///
/// `verb`: `list`, `watch`, `get`, `create`, `update`, `patch`, `delete`, `deletecollection`,
/// `write` (any of create/update/patch/delete/deletecollection) or `*`. `resource`: a plural
/// (`"events"` matches both event groups), a qualified plural, or `*`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    pub verb: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub action: FaultAction,
    /// How many more requests it applies to; None: until removed.
    pub times: Option<u32>,
}

impl FaultRule {
    pub fn new(verb: &str, resource: &str, action: FaultAction) -> Self {
        FaultRule {
            verb: verb.to_string(),
            resource: resource.to_string(),
            subresource: None,
            namespace: None,
            name: None,
            action,
            times: None,
        }
    }

    pub fn fail(verb: &str, resource: &str, status: u16) -> Self {
        Self::new(
            verb,
            resource,
            FaultAction::Fail {
                status,
                message: None,
            },
        )
    }

    pub fn hang(verb: &str, resource: &str) -> Self {
        Self::new(verb, resource, FaultAction::Hang)
    }

    pub fn delay(verb: &str, resource: &str, delay: Duration) -> Self {
        Self::new(verb, resource, FaultAction::Delay(delay))
    }

    /// Only the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    /// Only requests on this subresource (`"status"`).
    pub fn subresource(mut self, s: &str) -> Self {
        self.subresource = Some(s.to_string());
        self
    }

    /// Only requests for this object name.
    pub fn name(mut self, n: &str) -> Self {
        self.name = Some(n.to_string());
        self
    }

    /// Only requests in this namespace.
    pub fn namespace(mut self, n: &str) -> Self {
        self.namespace = Some(n.to_string());
        self
    }

    /// The message of the `Status` a `Fail` answers with.
    pub fn message(mut self, m: &str) -> Self {
        if let FaultAction::Fail { message, .. } = &mut self.action {
            *message = Some(m.to_string());
        }
        self
    }

    fn matches(&self, c: &Call) -> bool {
        let verb_ok = match self.verb.as_str() {
            "*" => true,
            "write" => matches!(
                c.verb.as_str(),
                "create" | "update" | "patch" | "delete" | "deletecollection"
            ),
            v => v == c.verb,
        };
        let res_ok = self.resource == "*"
            || self.resource == c.resource
            || (!c.group.is_empty() && self.resource == format!("{}.{}", c.resource, c.group));
        verb_ok
            && res_ok
            && !c.resource.is_empty()
            && self
                .subresource
                .as_ref()
                .is_none_or(|s| c.subresource.as_ref() == Some(s))
            && self
                .namespace
                .as_ref()
                .is_none_or(|s| c.namespace.as_ref() == Some(s))
            && self
                .name
                .as_ref()
                .is_none_or(|s| c.name.as_ref() == Some(s))
    }

    fn to_json(&self, id: u64) -> Value {
        let mut v = json!({
            "id": id,
            "verb": self.verb,
            "resource": self.resource,
            "subresource": self.subresource,
            "namespace": self.namespace,
            "name": self.name,
            "times": self.times,
        });
        match &self.action {
            FaultAction::Fail { status, message } => {
                v["action"] = json!("fail");
                v["status"] = json!(status);
                v["message"] = json!(message);
            }
            FaultAction::Hang => v["action"] = json!("hang"),
            FaultAction::Delay(d) => {
                v["action"] = json!("delay");
                v["delay_ms"] = json!(d.as_millis() as u64);
            }
        }
        v
    }

    /// Parses the admin API's form: `{"verb","resource","action":"fail"|"hang"|"delay",
    /// "status","message","delay_ms","times","subresource","namespace","name"}`.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(String::from);
        let action = match s("action").as_deref().unwrap_or("fail") {
            "fail" => FaultAction::Fail {
                status: v.get("status").and_then(Value::as_u64).unwrap_or(500) as u16,
                message: s("message"),
            },
            "hang" => FaultAction::Hang,
            "delay" => FaultAction::Delay(Duration::from_millis(
                v.get("delay_ms")
                    .and_then(Value::as_u64)
                    .ok_or("delay without delay_ms")?,
            )),
            other => return Err(format!("unknown action {other:?}")),
        };
        Ok(FaultRule {
            verb: s("verb").unwrap_or_else(|| "*".into()),
            resource: s("resource").unwrap_or_else(|| "*".into()),
            subresource: s("subresource"),
            namespace: s("namespace"),
            name: s("name"),
            action,
            times: v.get("times").and_then(Value::as_u64).map(|n| n as u32),
        })
    }
}

#[derive(Default)]
struct Faults {
    latency: Duration,
    rules: Vec<(u64, FaultRule)>,
    next_id: u64,
}

/// What the faults decided for one request.
#[derive(Default)]
struct FaultPlan {
    delay: Duration,
    hang: Option<u64>,
    fail: Option<ApiError>,
}

fn fault_error(c: &Call, status: u16, message: &Option<String>) -> ApiError {
    let def = try_resource_id(&c.qualified()).map(|i| &RESOURCES[i]);
    let mut e = match (status, message, def, &c.name) {
        (409, None, Some(def), Some(name)) => ApiError::modified(def, name),
        _ => ApiError::new(
            status,
            message.clone().unwrap_or_else(|| {
                format!(
                    "fake apiserver: injected {status} for {} {}",
                    c.verb, c.path
                )
            }),
        ),
    };
    if matches!(status, 429 | 503 | 504) {
        e.details = Some(json!({"retryAfterSeconds": 1}));
    }
    e
}

impl Faults {
    fn plan(&mut self, c: &Call) -> FaultPlan {
        let mut plan = FaultPlan {
            delay: self.latency,
            ..Default::default()
        };
        let mut used = vec![];
        for (id, rule) in &self.rules {
            // A spent hang (times reached 0) still holds its requests but catches no new ones.
            if rule.times == Some(0) || !rule.matches(c) {
                continue;
            }
            match &rule.action {
                FaultAction::Delay(d) => {
                    plan.delay += *d;
                    used.push(*id);
                }
                FaultAction::Hang if plan.hang.is_none() && plan.fail.is_none() => {
                    plan.hang = Some(*id);
                    used.push(*id);
                }
                FaultAction::Fail { status, message }
                    if plan.hang.is_none() && plan.fail.is_none() =>
                {
                    plan.fail = Some(fault_error(c, *status, message));
                    used.push(*id);
                }
                _ => {}
            }
        }
        for id in used {
            if let Some(pos) = self.rules.iter().position(|(i, _)| *i == id) {
                if let Some(t) = &mut self.rules[pos].1.times {
                    *t = t.saturating_sub(1);
                    // A hang stays registered (so it can be waited on) until its request is let go.
                    if *t == 0 && self.rules[pos].1.action != FaultAction::Hang {
                        self.rules.remove(pos);
                    }
                }
            }
        }
        plan
    }
}

// ---------------------------------------------------------------------------------------------
// Call log
// ---------------------------------------------------------------------------------------------

/// One request the server received (admin and internal helper calls are not logged). It is
/// logged when it arrives, before any fault delays or hangs it, so the log shows requests still
/// in flight: `status` is None until the answer is sent, and `abandoned` says the client went
/// away (closed the connection) before that.
#[derive(Debug, Clone)]
pub struct Call {
    pub id: u64,
    /// HTTP method.
    pub method: String,
    /// The authenticated user (`system:anonymous` without a token).
    pub user: String,
    /// The RBAC verb: list, watch, get, create, update, patch, delete, deletecollection
    /// (non-resource requests: the lowercase HTTP method, e.g. get).
    pub verb: String,
    pub group: String,
    /// Plural resource; empty for non-resource paths (`/version`, discovery).
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub path: String,
    /// The raw query string.
    pub query: String,
    pub content_type: Option<String>,
    /// The request body, as JSON (a string if it was not JSON); None when empty.
    pub body: Option<Value>,
    /// When it arrived.
    pub at: Instant,
    /// The HTTP status answered; None while the request is still pending (or hung), and for a
    /// request its client abandoned.
    pub status: Option<u16>,
    /// When the answer was sent.
    pub answered_at: Option<Instant>,
    /// The client closed the connection before an answer was sent (a client-side timeout or a
    /// cancelled request): the request is over, unanswered.
    pub abandoned: bool,
}

impl Call {
    /// Still waiting for its answer, with its client still waiting too.
    pub fn in_flight(&self) -> bool {
        self.status.is_none() && !self.abandoned
    }

    /// The query parameters, decoded.
    pub fn params(&self) -> HashMap<String, String> {
        parse_query(&self.query)
    }

    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    fn matches(&self, verb: &str, resource: &str) -> bool {
        (verb == "*" || verb == self.verb)
            && (resource == "*" || resource == self.resource || resource == self.qualified())
    }

    pub fn to_json(&self, since: Instant) -> Value {
        json!({
            "id": self.id,
            "method": self.method,
            "user": self.user,
            "verb": self.verb,
            "group": self.group,
            "resource": self.resource,
            "subresource": self.subresource,
            "namespace": self.namespace,
            "name": self.name,
            "path": self.path,
            "query": self.query,
            "content_type": self.content_type,
            "body": self.body,
            "at_ms": self.at.saturating_duration_since(since).as_secs_f64() * 1000.0,
            "status": self.status,
            "answered_at_ms": self.answered_at.map(|t| t.saturating_duration_since(since).as_secs_f64() * 1000.0),
            "abandoned": self.abandoned,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

struct Inner {
    addr: SocketAddr,
    started: Instant,
    store: Mutex<Store>,
    faults: Mutex<Faults>,
    calls: Mutex<Vec<Call>>,
    next_call: AtomicU64,
    bookmark_interval: Mutex<Duration>,
    /// Bumped whenever faults change (hung requests re-check).
    fault_gen: watch::Sender<u64>,
    /// Requests waiting on a hang right now.
    held: std::sync::atomic::AtomicUsize,
    /// Bumped by `drop_watches`.
    drop_gen: watch::Sender<u64>,
    /// Serialized list answers by (resource, namespace, query), valid while nothing of their
    /// resource type was written and their resourceVersion is not compacted. Off unless
    /// `cache_lists(true)`: benchmarks use it so the fake's own serializing does not hide the
    /// client's time.
    list_cache: Mutex<Option<ListCache>>,
    /// Bearer tokens and whom they authenticate.
    tokens: Mutex<HashMap<String, Identity>>,
    /// What the identities may do: the chart's RBAC unless a test sets another.
    policy: Mutex<Arc<Policy>>,
    /// Every request RBAC refused (403), kept apart from the call log, which tests clear.
    denials: Mutex<Vec<Call>>,
}

#[derive(Default)]
struct ListCache {
    pages: HashMap<(usize, Option<String>, String), CachedPage>,
}

/// One list answer as served. It stays true while its type is not written: a list served
/// from it again is the same answer at its (older) resourceVersion, which a watch can still
/// start from while that is not compacted.
struct CachedPage {
    bytes: Bytes,
    /// The store's resourceVersion when it was served.
    served_at: u64,
    /// The type's last write then.
    written: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Guard {
    task: JoinHandle<()>,
    inner: Arc<Inner>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
        self.inner.drop_gen.send_modify(|g| *g += 1);
        self.inner.fault_gen.send_modify(|g| *g += 1);
    }
}

/// The fake API server. Cloning shares it; it stops when the last clone is dropped (or with the
/// runtime it was started on).
#[derive(Clone)]
pub struct FakeApiServer {
    inner: Arc<Inner>,
    /// Stops the server when the last owning clone goes (None: the admin API's borrowed view).
    guard: Option<Arc<Guard>>,
}

impl fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl FakeApiServer {
    /// Starts on 127.0.0.1 on any free port, serving on the current tokio runtime.
    pub async fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind 127.0.0.1:0")
    }

    /// Starts on the given address (port 0: any free port).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            addr,
            started: Instant::now(),
            store: Mutex::new(Store::new()),
            faults: Mutex::new(Faults::default()),
            calls: Mutex::new(vec![]),
            next_call: AtomicU64::new(1),
            bookmark_interval: Mutex::new(DEFAULT_BOOKMARK_INTERVAL),
            fault_gen: watch::channel(0).0,
            held: std::sync::atomic::AtomicUsize::new(0),
            drop_gen: watch::channel(0).0,
            list_cache: Mutex::new(None),
            tokens: Mutex::new(HashMap::from([(
                HARNESS_TOKEN.to_string(),
                Identity::Harness,
            )])),
            policy: Mutex::new(Arc::new(Policy::chart().clone())),
            denials: Mutex::new(vec![]),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let guard = Some(Arc::new(Guard {
            task,
            inner: inner.clone(),
        }));
        Ok(FakeApiServer { inner, guard })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The kubeconfig text of the harness (allowed everything): one cluster (this server,
    /// plain http), one context, one user with [`HARNESS_TOKEN`]; namespace `default`.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_with_token(HARNESS_TOKEN)
    }

    /// A kubeconfig like [`Self::kubeconfig`] whose user is `who`.
    pub fn kubeconfig_as(&self, who: Identity) -> String {
        let token = self.token_for(who);
        self.kubeconfig_with_token(&token)
    }

    /// A bearer token that authenticates `who` (the same token for the same identity).
    pub fn token_for(&self, who: Identity) -> String {
        let mut tokens = lock(&self.inner.tokens);
        if let Some((t, _)) = tokens.iter().find(|(_, i)| **i == who) {
            return t.clone();
        }
        let token = format!("fake-token-{}", tokens.len());
        tokens.insert(token.clone(), who);
        token
    }

    /// Every request RBAC answered 403, in order (not emptied by [`Self::clear_calls`]).
    pub fn rbac_denials(&self) -> Vec<Call> {
        lock(&self.inner.denials).clone()
    }

    /// Returns and forgets the RBAC refusals: a test that provokes one on purpose takes it.
    pub fn take_rbac_denials(&self) -> Vec<Call> {
        std::mem::take(&mut *lock(&self.inner.denials))
    }

    /// Replaces the RBAC policy requests are authorized by (default: [`Policy::chart`]).
    pub fn set_policy(&self, policy: Policy) {
        *lock(&self.inner.policy) = Arc::new(policy);
    }

    fn kubeconfig_with_token(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             preferences: {{}}\n\
             clusters:\n\
             - name: fake\n  \
               cluster:\n    \
                 server: {url}\n\
             users:\n\
             - name: fake\n  \
               user:\n    \
                 token: {token}\n\
             contexts:\n\
             - name: fake\n  \
               context:\n    \
                 cluster: fake\n    \
                 user: fake\n    \
                 namespace: default\n\
             current-context: fake\n",
            url = self.url()
        )
    }

    /// Writes [`kubeconfig`](Self::kubeconfig) to `dir/kubeconfig` and returns the path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        self.write_kubeconfig_text(dir, &self.kubeconfig())
    }

    /// Writes [`kubeconfig_as`](Self::kubeconfig_as) `who` to `dir/kubeconfig`.
    pub fn write_kubeconfig_as(&self, dir: &Path, who: Identity) -> PathBuf {
        self.write_kubeconfig_text(dir, &self.kubeconfig_as(who))
    }

    fn write_kubeconfig_text(&self, dir: &Path, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create kubeconfig dir");
        let path = dir.join("kubeconfig");
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    // ----- store helpers (not logged, no faults; same logic and watch events as the API) -----

    /// Seeds an object: cluster state that exists before the test, as etcd would hold it (its
    /// namespace from `metadata.namespace`, default `default`). Unlike a create over HTTP, it
    /// keeps a given `status`, `uid` and `creationTimestamp` (an object created minutes ago), so
    /// tests can build any state in one step; a REST request can set none of them.
    pub fn create(&self, resource: &str, obj: Value) -> Result<Value, ApiError> {
        lock(&self.inner.store).create(resource_id(resource), None, obj, Origin::Seed)
    }

    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        lock(&self.inner.store)
            .get(resource_id(resource), namespace, name)
            .ok()
    }

    /// All objects of a type (in one namespace, or all), sorted by namespace/name.
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let filter = Filter {
            namespace: namespace.map(String::from),
            ..Default::default()
        };
        lock(&self.inner.store).objects[resource_id(resource)]
            .values()
            .filter(|o| filter.matches(o))
            .cloned()
            .collect()
    }

    /// Replaces an object (named by its metadata), as PUT does: status is kept for resources with
    /// a status subresource; a set `metadata.resourceVersion` must match.
    pub fn replace(&self, resource: &str, obj: Value) -> Result<Value, ApiError> {
        let ns = meta_str(&obj, "namespace").map(String::from);
        let name = meta_str(&obj, "name").unwrap_or("").to_string();
        lock(&self.inner.store).update(resource_id(resource), ns.as_deref(), &name, obj, false)
    }

    /// A JSON merge patch on the object (status changes ignored where status is a subresource).
    pub fn patch(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
        patch: Value,
    ) -> Result<Value, ApiError> {
        lock(&self.inner.store).patch(
            resource_id(resource),
            namespace,
            name,
            "application/merge-patch+json",
            &patch,
            false,
        )
    }

    /// A JSON merge patch through the status subresource (only `status` changes).
    pub fn patch_status(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
        patch: Value,
    ) -> Result<Value, ApiError> {
        lock(&self.inner.store).patch(
            resource_id(resource),
            namespace,
            name,
            "application/merge-patch+json",
            &patch,
            true,
        )
    }

    /// Deletes as the API does: with finalizers, only marks it (deletionTimestamp).
    pub fn delete(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<DeleteOutcome, ApiError> {
        lock(&self.inner.store).delete(resource_id(resource), namespace, name, None)
    }

    /// Deletes an object (ignoring finalizers) without telling the watches open now, as if
    /// their streams lagged: live reads already see it gone, caches fed by those watches still
    /// hold it. The deletion is in the history, so a watch started or resumed later sees it.
    pub fn delete_unwatched(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        lock(&self.inner.store).delete_unwatched(resource_id(resource), namespace, name)
    }

    /// Sends one watch event of `kind` (`ADDED`, `MODIFIED`, `DELETED`) carrying `object` to every
    /// open watch of `resource` whose selectors match it, without touching the store or its
    /// history: a cache fed by those watches believes it, live reads do not. Returns how many
    /// watches it reached.
    pub fn forge_watch_event(&self, resource: &str, kind: &str, object: Value) -> usize {
        let ty = resource_id(resource);
        let def = &RESOURCES[ty];
        let mut object = object;
        Store::set_type_meta(def, &mut object);
        let line = watch_line(kind, &object);
        let st = lock(&self.inner.store);
        st.watchers
            .iter()
            .filter(|w| w.ty == ty && w.filter.matches(&object))
            .filter(|w| w.tx.send(line.clone()).is_ok())
            .count()
    }

    /// Empties `metadata.finalizers` (finishing a pending deletion).
    pub fn remove_finalizers(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.patch(
            resource,
            namespace,
            name,
            json!({"metadata": {"finalizers": null}}),
        )
    }

    /// The current (global) resourceVersion.
    /// Turns the list-answer cache on or off. On, a list repeated while nothing was written is
    /// answered with the bytes served the first time (faults still apply first), so a benchmark
    /// can measure its client rather than this server's serializing.
    pub fn cache_lists(&self, on: bool) {
        *lock(&self.inner.list_cache) = on.then(ListCache::default);
    }

    pub fn resource_version(&self) -> u64 {
        lock(&self.inner.store).rv
    }

    /// Forgets the event history: watches and continue tokens from before now get 410 Gone.
    pub fn compact_history(&self) {
        lock(&self.inner.store).compact();
    }

    /// How many watch events are kept (default 10 000).
    pub fn set_history_limit(&self, n: usize) {
        let mut st = lock(&self.inner.store);
        st.history_limit = n.max(1);
        while st.history.len() > st.history_limit {
            if let Some(old) = st.history.pop_front() {
                st.compacted_rv = st.compacted_rv.max(old.rv);
            }
        }
    }

    /// How often watches that allow bookmarks get one (default 1 s).
    pub fn set_bookmark_interval(&self, d: Duration) {
        *lock(&self.inner.bookmark_interval) = d.max(Duration::from_millis(10));
    }

    /// Watch streams currently open (optionally of one resource).
    pub fn open_watches(&self, resource: Option<&str>) -> usize {
        let ty = resource.map(resource_id);
        lock(&self.inner.store)
            .watchers
            .iter()
            .filter(|w| !w.tx.is_closed() && ty.is_none_or(|t| t == w.ty))
            .count()
    }

    // ----- faults -----

    /// Adds a fault; returns its id (for [`remove_fault`](Self::remove_fault)).
    pub fn add_fault(&self, rule: FaultRule) -> u64 {
        let id = {
            let mut f = lock(&self.inner.faults);
            f.next_id += 1;
            let id = f.next_id;
            f.rules.push((id, rule));
            id
        };
        self.inner.fault_gen.send_modify(|g| *g += 1);
        id
    }

    pub fn remove_fault(&self, id: u64) {
        lock(&self.inner.faults).rules.retain(|(i, _)| *i != id);
        self.inner.fault_gen.send_modify(|g| *g += 1);
    }

    /// The active faults with their ids.
    pub fn faults(&self) -> Vec<(u64, FaultRule)> {
        lock(&self.inner.faults).rules.clone()
    }

    /// Delay added to every API request.
    pub fn set_latency(&self, d: Duration) {
        lock(&self.inner.faults).latency = d;
        self.inner.fault_gen.send_modify(|g| *g += 1);
    }

    /// Matching requests fail with `status` until removed.
    pub fn fail(&self, verb: &str, resource: &str, status: u16) -> u64 {
        self.add_fault(FaultRule::fail(verb, resource, status))
    }

    /// The next `n` matching requests fail with `status`.
    pub fn fail_times(&self, verb: &str, resource: &str, status: u16, n: u32) -> u64 {
        self.add_fault(FaultRule::fail(verb, resource, status).times(n))
    }

    /// Every create/update/patch/delete on every resource fails with `status`.
    pub fn fail_writes(&self, status: u16) -> u64 {
        self.add_fault(FaultRule::fail("write", "*", status))
    }

    /// Matching requests hang, answering nothing, until the fault is removed or cleared.
    pub fn hang(&self, verb: &str, resource: &str) -> u64 {
        self.add_fault(FaultRule::hang(verb, resource))
    }

    /// Matching requests are answered `d` late.
    pub fn delay(&self, verb: &str, resource: &str, d: Duration) -> u64 {
        self.add_fault(FaultRule::delay(verb, resource, d))
    }

    /// The next `n` patches (any resource) get 409 Conflict.
    pub fn conflict_on_patch(&self, n: u32) -> u64 {
        self.add_fault(FaultRule::fail("patch", "*", 409).times(n))
    }

    /// Ends every open watch stream abruptly (the connection is cut mid-stream).
    pub fn drop_watches(&self) {
        self.inner.drop_gen.send_modify(|g| *g += 1);
    }

    /// How many requests a hang holds right now: the witness that a request reached its hang
    /// (and so is answered only once the hang is removed).
    pub fn held_requests(&self) -> usize {
        self.inner.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Removes every fault and the latency; hung requests proceed.
    pub fn clear_faults(&self) {
        {
            let mut f = lock(&self.inner.faults);
            f.rules.clear();
            f.latency = Duration::ZERO;
        }
        self.inner.fault_gen.send_modify(|g| *g += 1);
    }

    /// The faults as JSON (what `GET /__fake/faults` serves).
    pub fn faults_json(&self) -> Value {
        let f = lock(&self.inner.faults);
        json!({
            "latency_ms": f.latency.as_millis() as u64,
            "rules": f.rules.iter().map(|(id, r)| r.to_json(*id)).collect::<Vec<_>>(),
        })
    }

    /// What `POST /__fake/faults` does with its body: an object (or an array of them) with any of
    /// `latency_ms`, `drop_watches` (true), `conflict_on_patch` (n), `fail_writes` (status),
    /// `rules` (an array of rules), or a rule's own fields (see [`FaultRule::from_json`]).
    /// Returns `{"ids": [...]}`, the ids of the rules added.
    pub fn apply_fault_json(&self, v: &Value) -> Result<Value, ApiError> {
        if let Some(items) = v.as_array() {
            let mut ids = vec![];
            for item in items {
                if let Some(a) = self
                    .apply_fault_json(item)?
                    .get("ids")
                    .and_then(Value::as_array)
                {
                    ids.extend(a.iter().cloned());
                }
            }
            return Ok(json!({"ids": ids}));
        }
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::bad_request("expected a JSON object or array"))?;
        let mut rules = vec![];
        if let Some(n) = obj.get("conflict_on_patch").and_then(Value::as_u64) {
            rules.push(FaultRule::fail("patch", "*", 409).times(n as u32));
        }
        if let Some(s) = obj.get("fail_writes").and_then(Value::as_u64) {
            rules.push(FaultRule::fail("write", "*", s as u16));
        }
        if let Some(list) = obj.get("rules").and_then(Value::as_array) {
            for r in list {
                rules.push(FaultRule::from_json(r).map_err(ApiError::bad_request)?);
            }
        }
        if obj.contains_key("verb") || obj.contains_key("resource") || obj.contains_key("action") {
            rules.push(FaultRule::from_json(v).map_err(ApiError::bad_request)?);
        }
        if let Some(ms) = obj.get("latency_ms").and_then(Value::as_u64) {
            self.set_latency(Duration::from_millis(ms));
        }
        if obj.get("drop_watches").and_then(Value::as_bool) == Some(true) {
            self.drop_watches();
        }
        let ids: Vec<u64> = rules.into_iter().map(|r| self.add_fault(r)).collect();
        Ok(json!({"ids": ids}))
    }

    // ----- call log -----

    pub fn calls(&self) -> Vec<Call> {
        lock(&self.inner.calls).clone()
    }

    pub fn clear_calls(&self) {
        lock(&self.inner.calls).clear();
    }

    /// Calls with this verb and resource (`*` matches any; a resource may be group-qualified).
    pub fn calls_matching(&self, verb: &str, resource: &str) -> Vec<Call> {
        lock(&self.inner.calls)
            .iter()
            .filter(|c| c.matches(verb, resource))
            .cloned()
            .collect()
    }

    pub fn count_calls(&self, verb: &str, resource: &str) -> usize {
        lock(&self.inner.calls)
            .iter()
            .filter(|c| c.matches(verb, resource))
            .count()
    }

    /// Waits (polling) until at least `n` matching calls were logged; false on timeout.
    pub async fn wait_for_calls(
        &self,
        verb: &str,
        resource: &str,
        n: usize,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count_calls(verb, resource) >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The call log as JSON (what `GET /__fake/calls` serves).
    pub fn calls_json(&self) -> Value {
        let since = self.inner.started;
        Value::Array(
            lock(&self.inner.calls)
                .iter()
                .map(|c| c.to_json(since))
                .collect(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// The query with its parameters sorted, so equal requests share a cache entry.
fn canonical_query(q: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = q.iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn bytes_response(bytes: Bytes) -> Response {
    let mut resp = Response::new(Body::from(bytes));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn json_response(code: u16, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(serde_json::to_vec(body).expect("serializable")));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &ApiError) -> Response {
    let mut resp = json_response(e.code, &e.to_status());
    if let Some(secs) = e
        .details
        .as_ref()
        .and_then(|d| d.get("retryAfterSeconds"))
        .and_then(Value::as_u64)
    {
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

fn text_response(code: u16, text: &'static str) -> Response {
    let mut resp = Response::new(Body::from(text));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A request routed to a resource.
struct Route {
    ty: usize,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    verb: &'static str,
}

enum Target {
    Resource(Route),
    NonResource(Value),
    Text(&'static str),
}

fn route(
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
    addr: SocketAddr,
) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest): (&str, &[&str]) = match segs.as_slice() {
        [] => return Ok(Target::NonResource(root_paths())),
        ["version"] => return Ok(Target::NonResource(version_doc())),
        ["healthz"] | ["livez"] | ["readyz"] => return Ok(Target::Text("ok")),
        ["api"] => {
            return Ok(Target::NonResource(json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
            })))
        }
        ["apis"] => return Ok(Target::NonResource(group_list())),
        ["apis", g] => {
            return group_doc(g)
                .map(Target::NonResource)
                .ok_or_else(ApiError::resource_not_found);
        }
        ["api", "v1"] => return Ok(Target::NonResource(resource_list(""))),
        ["apis", g, "v1"] if RESOURCES.iter().any(|d| d.group == *g) => {
            return Ok(Target::NonResource(resource_list(g)));
        }
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g, "v1", rest @ ..] => (*g, rest),
        _ => return Err(ApiError::resource_not_found()),
    };
    let (namespace, plural, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..] => {
            (Some(ns.to_string()), *plural, tail.first(), tail.get(1))
        }
        [plural, tail @ ..] => (None, *plural, tail.first(), tail.get(1)),
        [] => return Err(ApiError::resource_not_found()),
    };
    let max_len = if namespace.is_some() { 5 } else { 3 };
    if rest.len() > max_len {
        return Err(ApiError::resource_not_found());
    }
    let ty = find_resource(group, plural).ok_or_else(ApiError::resource_not_found)?;
    let def = &RESOURCES[ty];
    if namespace.is_some() && !def.namespaced {
        return Err(ApiError::resource_not_found());
    }
    if namespace.is_none() && def.namespaced && name.is_some() {
        return Err(ApiError::resource_not_found());
    }
    let subresource = match sub {
        None => None,
        Some(&"status") if def.has_status => Some("status".to_string()),
        Some(_) => return Err(ApiError::resource_not_found()),
    };
    let verb = match (name.is_some(), method.clone()) {
        (false, Method::GET) => {
            if parse_bool(q.get("watch")) {
                "watch"
            } else {
                "list"
            }
        }
        (false, Method::POST) if namespace.is_some() || !def.namespaced => "create",
        (false, Method::DELETE) if namespace.is_some() || !def.namespaced => "deletecollection",
        (true, Method::GET) => "get",
        (true, Method::PUT) => "update",
        (true, Method::PATCH) => "patch",
        (true, Method::DELETE) if subresource.is_none() => "delete",
        (_, m) => return Err(ApiError::method_not_allowed(&m)),
    };
    Ok(Target::Resource(Route {
        ty,
        namespace,
        name: name.map(|s| s.to_string()),
        subresource,
        verb,
    }))
}

fn root_paths() -> Value {
    let mut paths = vec![
        "/api".to_string(),
        "/api/v1".into(),
        "/apis".into(),
        "/healthz".into(),
        "/livez".into(),
    ];
    for d in RESOURCES.iter().filter(|d| !d.group.is_empty()) {
        for p in [
            format!("/apis/{}", d.group),
            format!("/apis/{}/{}", d.group, d.version),
        ] {
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
    }
    paths.extend(["/readyz".to_string(), "/version".into()]);
    json!({"paths": paths})
}

/// What `/version` says: Kubernetes v1.34.0.
pub fn version_doc() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "emulationMajor": "1",
        "emulationMinor": "34",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "33",
        "gitVersion": "v1.34.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-08-27T00:00:00Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn group_doc(group: &str) -> Option<Value> {
    let d = RESOURCES
        .iter()
        .find(|d| d.group == group && !group.is_empty())?;
    let gv = json!({"groupVersion": d.api_version(), "version": d.version});
    Some(json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": [gv.clone()],
        "preferredVersion": gv,
    }))
}

fn group_list() -> Value {
    let mut groups: Vec<&str> = RESOURCES
        .iter()
        .map(|d| d.group)
        .filter(|g| !g.is_empty())
        .collect();
    groups.dedup();
    let groups: Vec<Value> = groups.into_iter().filter_map(group_doc).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group: &str) -> Value {
    let mut resources = vec![];
    let mut gv = String::from("v1");
    for d in RESOURCES.iter().filter(|d| d.group == group) {
        gv = d.api_version();
        let verbs = [
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        resources.push(json!({
            "name": d.plural,
            "singularName": d.singular,
            "namespaced": d.namespaced,
            "kind": d.kind,
            "verbs": verbs,
        }));
        if d.has_status {
            resources.push(json!({
                "name": format!("{}/status", d.plural),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": d.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_string());
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return error_response(&ApiError::new(413, "request entity too large")),
    };
    if path == "/__fake" || path.starts_with("/__fake/") {
        return admin(&inner, &method, &path, &body);
    }
    let q = parse_query(&query);
    // Authentication, then authorization, come before the request is routed (apiserver's
    // filter chain): an unknown token is 401, a request RBAC does not allow 403, whatever
    // the path names.
    let who = match &token {
        None => Some(Identity::Anonymous),
        Some(t) => lock(&inner.tokens).get(t).cloned(),
    };
    let attributes = Attributes::from_request(method.as_str(), &path, &q);
    let denied = match &who {
        None => Some(error_response(
            &ApiError::new(401, "Unauthorized").with_details(json!({})),
        )),
        Some(who) if !lock(&inner.policy).allows(who, &attributes) => {
            Some(json_response(403, &attributes.forbidden(&who.user())))
        }
        Some(_) => None,
    };
    let target = route(&method, &path, &q, inner.addr);
    let mut call = Call {
        id: inner.next_call.fetch_add(1, Ordering::Relaxed),
        method: method.to_string(),
        user: who.as_ref().map(Identity::user).unwrap_or_default(),
        // Non-resource requests: the lowercase HTTP method, as RBAC names their verbs.
        verb: method.as_str().to_ascii_lowercase(),
        group: String::new(),
        resource: String::new(),
        subresource: None,
        namespace: None,
        name: None,
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        body: if body.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice(&body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())),
            )
        },
        at: Instant::now(),
        status: None,
        answered_at: None,
        abandoned: false,
    };
    if let Ok(Target::Resource(r)) = &target {
        let def = &RESOURCES[r.ty];
        call.verb = r.verb.to_string();
        call.group = def.group.to_string();
        call.resource = def.plural.to_string();
        call.subresource = r.subresource.clone();
        call.namespace = r.namespace.clone();
        call.name = r.name.clone();
    }
    let call_id = call.id;
    if let Some(resp) = denied {
        // Logged as authorization read it, served resource or not.
        call.verb = attributes.verb.clone();
        call.group = attributes.group.clone();
        call.resource = attributes.resource.clone();
        call.subresource = attributes.subresource.clone();
        call.namespace = attributes.namespace.clone();
        call.name = attributes.name.clone();
        call.status = Some(resp.status().as_u16());
        call.answered_at = Some(Instant::now());
        if call.status == Some(403) {
            lock(&inner.denials).push(call.clone());
        }
        lock(&inner.calls).push(call);
        return resp;
    }
    let plan = if call.resource.is_empty() {
        FaultPlan::default()
    } else {
        lock(&inner.faults).plan(&call)
    };
    lock(&inner.calls).push(call);
    // Dropped unanswered when the client goes away: hyper then drops this future.
    let mut pending = PendingCall {
        inner: inner.clone(),
        id: call_id,
        answered: false,
    };
    let resp = respond(&inner, target, plan, &q, content_type.as_deref(), &body).await;
    pending.answer(resp.status().as_u16());
    resp
}

/// A logged call waiting for its answer; dropped unanswered, it marks the call abandoned.
/// Counts one request as held by a hang while it waits (also when its client goes).
struct HeldRequest<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> HeldRequest<'a> {
    fn count(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for HeldRequest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct PendingCall {
    inner: Arc<Inner>,
    id: u64,
    answered: bool,
}

impl PendingCall {
    fn update(&self, f: impl FnOnce(&mut Call)) {
        if let Some(c) = lock(&self.inner.calls)
            .iter_mut()
            .rev()
            .find(|c| c.id == self.id)
        {
            f(c);
        }
    }

    fn answer(&mut self, status: u16) {
        self.answered = true;
        self.update(|c| {
            c.status = Some(status);
            c.answered_at = Some(Instant::now());
        });
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if !self.answered {
            self.update(|c| c.abandoned = true);
        }
    }
}

async fn respond(
    inner: &Arc<Inner>,
    target: Result<Target, ApiError>,
    plan: FaultPlan,
    q: &HashMap<String, String>,
    content_type: Option<&str>,
    body: &Bytes,
) -> Response {
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    if let Some(id) = plan.hang {
        let mut rx = inner.fault_gen.subscribe();
        let _held = HeldRequest::count(&inner.held);
        loop {
            rx.borrow_and_update();
            if !lock(&inner.faults).rules.iter().any(|(i, _)| *i == id) {
                break;
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
    }
    if let Some(e) = plan.fail {
        return error_response(&e);
    }
    match target {
        Err(e) => error_response(&e),
        Ok(Target::Text(t)) => text_response(200, t),
        Ok(Target::NonResource(v)) => json_response(200, &v),
        Ok(Target::Resource(r)) => match resource_request(inner, r, q, content_type, body) {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        },
    }
}

fn parse_body(content_type: Option<&str>, body: &Bytes) -> Result<Value, ApiError> {
    match content_type {
        None | Some("application/json") | Some("") => {}
        Some(ct) if ct.ends_with("+json") => {}
        Some(ct) => {
            return Err(ApiError::new(
                415,
                format!("the body of the request was in an unknown format - accepted media types include: application/json ({ct})"),
            ))
        }
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))
    })
}

fn resource_request(
    inner: &Arc<Inner>,
    r: Route,
    q: &HashMap<String, String>,
    content_type: Option<&str>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let def = &RESOURCES[r.ty];
    let ns = r.namespace.as_deref();
    let name = r.name.as_deref().unwrap_or("");
    let status_only = r.subresource.is_some();
    match r.verb {
        "list" => {
            let filter = Filter::from_query(def, ns, q)?;
            let opts = ListOpts::from_query(q)?;
            let store = lock(&inner.store);
            let key = (r.ty, r.namespace.clone(), canonical_query(q));
            if let Some(cache) = lock(&inner.list_cache).as_mut() {
                match cache.pages.get(&key) {
                    Some(page)
                        if page.written == store.written[r.ty]
                            && page.served_at >= store.compacted_rv =>
                    {
                        return Ok(bytes_response(page.bytes.clone()));
                    }
                    Some(_) => {
                        cache.pages.remove(&key);
                    }
                    None => {}
                }
            }
            let list = store.list(r.ty, &filter, &opts)?;
            let bytes = Bytes::from(serde_json::to_vec(&list).expect("serializable"));
            if let Some(cache) = lock(&inner.list_cache).as_mut() {
                let page = CachedPage {
                    bytes: bytes.clone(),
                    served_at: store.rv,
                    written: store.written[r.ty],
                };
                cache.pages.insert(key, page);
            }
            Ok(bytes_response(bytes))
        }
        "watch" => {
            let filter = Filter::from_query(def, ns, q)?;
            let mut drop_rx = inner.drop_gen.subscribe();
            drop_rx.borrow_and_update();
            let start = lock(&inner.store).start_watch(r.ty, filter, q, drop_rx)?;
            Ok(watch_response(inner.clone(), start))
        }
        "get" => Ok(json_response(200, &lock(&inner.store).get(r.ty, ns, name)?)),
        "create" => {
            let obj = parse_body(content_type, body)?;
            Ok(json_response(
                201,
                &lock(&inner.store).create(r.ty, ns, obj, Origin::Request)?,
            ))
        }
        "update" => {
            let obj = parse_body(content_type, body)?;
            Ok(json_response(
                200,
                &lock(&inner.store).update(r.ty, ns, name, obj, status_only)?,
            ))
        }
        "patch" => {
            let ct = content_type.unwrap_or("");
            let patch: Value = serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!(
                    "the body of the request could not be decoded as JSON: {e}"
                ))
            })?;
            Ok(json_response(
                200,
                &lock(&inner.store).patch(r.ty, ns, name, ct, &patch, status_only)?,
            ))
        }
        "delete" => {
            let opts = if body.is_empty() {
                None
            } else {
                Some(parse_body(content_type, body)?)
            };
            let outcome = lock(&inner.store).delete(r.ty, ns, name, opts.as_ref())?;
            Ok(match outcome {
                DeleteOutcome::Pending(obj) => json_response(200, &obj),
                DeleteOutcome::Deleted(obj) => json_response(
                    200,
                    &json!({
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {
                            "name": name,
                            "group": def.group,
                            "kind": def.plural,
                            "uid": meta_str(&obj, "uid").unwrap_or(""),
                        },
                    }),
                ),
            })
        }
        "deletecollection" => {
            let filter = Filter::from_query(def, ns, q)?;
            let opts = if body.is_empty() {
                None
            } else {
                Some(parse_body(content_type, body)?)
            };
            let mut st = lock(&inner.store);
            let targets: Vec<(Option<String>, String)> = st.objects[r.ty]
                .values()
                .filter(|o| filter.matches(o))
                .map(|o| {
                    (
                        meta_str(o, "namespace").map(String::from),
                        meta_str(o, "name").unwrap_or("").to_string(),
                    )
                })
                .collect();
            let mut items = vec![];
            for (ons, oname) in targets {
                match st.delete(r.ty, ons.as_deref(), &oname, opts.as_ref())? {
                    DeleteOutcome::Pending(o) | DeleteOutcome::Deleted(o) => {
                        items.push(strip_type_meta(o))
                    }
                }
            }
            let rv = st.rv;
            Ok(json_response(
                200,
                &json!({
                    "kind": format!("{}List", def.kind),
                    "apiVersion": def.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                }),
            ))
        }
        _ => Err(ApiError::new(500, "unrouted verb")),
    }
}

fn watch_response(inner: Arc<Inner>, start: WatchStart) -> Response {
    let (out_tx, out_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(watch_task(inner, start, out_tx));
    let mut resp = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(out_rx),
    ));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}

async fn watch_task(
    inner: Arc<Inner>,
    start: WatchStart,
    out: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let WatchStart {
        id,
        mut drop_rx,
        ty,
        lines,
        ended,
        mut rx,
        bookmarks,
        timeout,
    } = start;
    let result = async {
        for line in lines {
            out.send(Ok(Bytes::from(line))).await.map_err(|_| ())?;
        }
        if ended {
            return Ok(());
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let interval = *lock(&inner.bookmark_interval);
        let mut next_bookmark = tokio::time::Instant::now() + interval;
        loop {
            tokio::select! {
                line = rx.recv() => match line {
                    Some(l) => out.send(Ok(Bytes::from(l))).await.map_err(|_| ())?,
                    None => return Ok(()),
                },
                _ = tokio::time::sleep_until(next_bookmark), if bookmarks => {
                    next_bookmark = tokio::time::Instant::now() + *lock(&inner.bookmark_interval);
                    let (pending, rv) = {
                        let st = lock(&inner.store);
                        let mut pending = vec![];
                        while let Ok(l) = rx.try_recv() {
                            pending.push(l);
                        }
                        (pending, st.rv)
                    };
                    for l in pending {
                        out.send(Ok(Bytes::from(l))).await.map_err(|_| ())?;
                    }
                    let def = &RESOURCES[ty];
                    let bm = json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                    out.send(Ok(Bytes::from(watch_line("BOOKMARK", &bm)))).await.map_err(|_| ())?;
                }
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    return Ok(());
                }
                r = drop_rx.changed() => {
                    let _ = r;
                    let _ = out.send(Err(std::io::Error::other("fake apiserver: watch dropped"))).await;
                    return Err(());
                }
                _ = out.closed() => return Err(()),
            }
        }
    }
    .await;
    let _ = result;
    lock(&inner.store).watchers.retain(|w| w.id != id);
}

fn admin(inner: &Arc<Inner>, method: &Method, path: &str, body: &Bytes) -> Response {
    let server = FakeApiServer {
        inner: inner.clone(),
        guard: None,
    };
    let parsed = || -> Result<Value, ApiError> {
        if body.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("bad JSON: {e}")))
    };
    let result: Result<Value, ApiError> = match (method.clone(), path.trim_end_matches('/')) {
        (Method::GET, "/__fake/calls") => Ok(server.calls_json()),
        (Method::DELETE, "/__fake/calls") => {
            server.clear_calls();
            Ok(json!({}))
        }
        (Method::GET, "/__fake/faults") => Ok(server.faults_json()),
        (Method::DELETE, "/__fake/faults") => {
            server.clear_faults();
            Ok(json!({}))
        }
        (Method::POST, "/__fake/faults") => parsed().and_then(|v| server.apply_fault_json(&v)),
        (Method::POST, "/__fake/drop-watches") => {
            server.drop_watches();
            Ok(json!({}))
        }
        (Method::POST, "/__fake/compact") => {
            server.compact_history();
            Ok(json!({}))
        }
        (Method::GET, "/__fake/state") => Ok(json!({
            "resourceVersion": server.resource_version(),
            "openWatches": server.open_watches(None),
        })),
        _ => Err(ApiError::new(
            404,
            format!("unknown admin path {method} {path}"),
        )),
    };
    match result {
        Ok(v) => json_response(200, &v),
        Err(e) => error_response(&e),
    }
}
