//! Authentication and authorization for the fake API server: who a request is (its bearer
//! token) and whether RBAC lets that user make it. Owns the request attributes authorization
//! is decided on, the identities tokens stand for, and the RBAC policy read from rendered
//! manifests; it never touches the store.
//!
//! The rules are the real server's, written from the Kubernetes RBAC documentation and the
//! apiserver's request-info and forbidden-message code:
//! - a request is authorized on its attributes before anything else happens, so an unknown
//!   resource or a missing object is 403 to a user who may not ask, never 404;
//! - a ClusterRoleBinding grants its ClusterRole's rules in every namespace and at the cluster
//!   scope; a RoleBinding grants its Role's (or ClusterRole's) rules in its own namespace only;
//! - a rule matches when its apiGroups, resources (`resource/subresource` for a subresource)
//!   and verbs contain the request's (or `*`), and, if it lists resourceNames, the request
//!   names one of them (a list or watch names an object only through a `metadata.name=` field
//!   selector; a create names none);
//! - a service account's token authenticates `system:serviceaccount:<ns>:<name>`, in the groups
//!   `system:serviceaccounts`, `system:serviceaccounts:<ns>` and `system:authenticated`; a
//!   request without a token is `system:anonymous` in `system:unauthenticated`;
//! - every authenticated user may read the discovery and health paths (the default
//!   `system:discovery` and `system:public-info-viewer` ClusterRoles), an anonymous one only the
//!   health paths and `/version`.
//!
//! Included by `fake_apiserver.rs` as its `rbac` module.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use serde_json::{json, Value};

/// The RBAC of the kustomize base, which `.ci/render-manifests` renders from the chart with its
/// defaults (every render holds the same driver roles: tests/deploy.rs checks that).
pub const CHART_RBAC: &str = "deploy/kubernetes/rbac.yaml";

/// Who a request is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// The test harness: allowed everything, as a cluster admin is. Tests of the fake's REST
    /// semantics and harness helpers speak as it.
    Harness,
    /// A service account's token. `roles`, when set, narrows the account to the bindings of
    /// those (Cluster)Roles: one container of a pod whose containers share the account, held to
    /// the roles the chart writes for it (the driver beside the sidecars of the controller
    /// pod). The user name is the account's either way.
    ServiceAccount {
        namespace: String,
        name: String,
        roles: Option<BTreeSet<String>>,
    },
    /// No token.
    Anonymous,
}

impl Identity {
    /// A service account with every binding it has.
    pub fn service_account(namespace: &str, name: &str) -> Identity {
        Identity::ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
            roles: None,
        }
    }

    /// A service account held to the bindings of `roles`.
    pub fn service_account_with_roles(namespace: &str, name: &str, roles: &[&str]) -> Identity {
        Identity::ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
            roles: Some(roles.iter().map(|r| r.to_string()).collect()),
        }
    }

    /// The user name authorization and its messages use.
    pub fn user(&self) -> String {
        match self {
            Identity::Harness => "fake:harness".into(),
            Identity::ServiceAccount {
                namespace, name, ..
            } => format!("system:serviceaccount:{namespace}:{name}"),
            Identity::Anonymous => "system:anonymous".into(),
        }
    }

    fn groups(&self) -> Vec<String> {
        match self {
            Identity::Harness => vec!["system:masters".into(), "system:authenticated".into()],
            Identity::ServiceAccount { namespace, .. } => vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            Identity::Anonymous => vec!["system:unauthenticated".into()],
        }
    }
}

/// What a request asks, as the apiserver's request-info filter reads it from the method, the
/// path and the query, whether or not the resource is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    /// get, list, watch, create, update, patch, delete, deletecollection; for a non-resource
    /// path the lowercase HTTP method.
    pub verb: String,
    pub group: String,
    /// Plural resource; empty for a non-resource path.
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub path: String,
}

impl Attributes {
    pub fn from_request(method: &str, path: &str, query: &HashMap<String, String>) -> Self {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let non_resource = || Attributes {
            verb: method.to_ascii_lowercase(),
            group: String::new(),
            resource: String::new(),
            subresource: None,
            namespace: None,
            name: None,
            path: path.to_string(),
        };
        let (group, mut rest): (&str, &[&str]) = match segs.as_slice() {
            ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", group, _version, rest @ ..] if !rest.is_empty() => (group, rest),
            _ => return non_resource(),
        };
        let mut watch_path = false;
        if rest.first() == Some(&"watch") {
            watch_path = true;
            rest = &rest[1..];
        }
        let (namespace, parts): (Option<&str>, &[&str]) = match rest {
            ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(ns), tail),
            ["namespaces", ns] => (Some(ns), &rest[..2]),
            other => (None, other),
        };
        // `/api/v1/namespaces/NAME` is the Namespace NAME itself.
        let (resource, name, subresource) = match (namespace, parts) {
            (Some(ns), ["namespaces", _]) => ("namespaces", Some(ns), None),
            (_, [resource]) => (*resource, None, None),
            (_, [resource, name]) => (*resource, Some(*name), None),
            (_, [resource, name, sub, ..]) => (*resource, Some(*name), Some(*sub)),
            _ => return non_resource(),
        };
        let namespace = match (resource, parts) {
            ("namespaces", ["namespaces", _]) => None,
            _ => namespace,
        };
        let watch = watch_path
            || query
                .get("watch")
                .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "0" | "false"));
        let verb = match (method, name.is_some()) {
            ("GET" | "HEAD", true) if !watch => "get",
            ("GET" | "HEAD", _) if watch => "watch",
            ("GET" | "HEAD", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            (other, _) => {
                return Attributes {
                    verb: other.to_ascii_lowercase(),
                    ..non_resource()
                }
            }
        };
        // A list or watch of one object by field selector names it, so a resourceNames rule
        // can allow it.
        let name = name.map(String::from).or_else(|| {
            matches!(verb, "list" | "watch")
                .then(|| query.get("fieldSelector"))
                .flatten()
                .and_then(|s| {
                    s.split(',')
                        .find_map(|term| term.trim().strip_prefix("metadata.name="))
                        .map(String::from)
                })
        });
        Attributes {
            verb: verb.into(),
            group: group.to_string(),
            resource: resource.to_string(),
            subresource: subresource.map(String::from),
            namespace: namespace.map(String::from),
            name,
            path: path.to_string(),
        }
    }

    fn is_resource(&self) -> bool {
        !self.resource.is_empty()
    }

    fn resource_with_sub(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }

    /// The 403 Status the real server answers (apiserver `responsewriters.Forbidden` wrapped
    /// in `NewForbidden`): `<resource>[.group] ["<name>"] is forbidden: User "<user>" cannot
    /// <verb> resource "<resource>[/sub]" in API group "<group>" in the namespace "<ns>"` (or
    /// `at the cluster scope`); for a path, `forbidden: User "<user>" cannot <verb> path
    /// "<path>"`.
    pub fn forbidden(&self, user: &str) -> Value {
        let (message, details) = if self.is_resource() {
            let why = format!(
                "User {user:?} cannot {} resource {:?} in API group {:?} {}",
                self.verb,
                self.resource_with_sub(),
                self.group,
                match &self.namespace {
                    Some(ns) => format!("in the namespace {ns:?}"),
                    None => "at the cluster scope".into(),
                }
            );
            let qualified = if self.group.is_empty() {
                self.resource.clone()
            } else {
                format!("{}.{}", self.resource, self.group)
            };
            let mut details = json!({"group": self.group, "kind": self.resource});
            let message = match self.name.as_deref().filter(|n| !n.is_empty()) {
                Some(name) => {
                    details["name"] = json!(name);
                    format!("{qualified} {name:?} is forbidden: {why}")
                }
                None => format!("{qualified} is forbidden: {why}"),
            };
            (message, details)
        } else {
            (
                format!(
                    "forbidden: User {user:?} cannot {} path {:?}",
                    self.verb, self.path
                ),
                json!({}),
            )
        };
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "Forbidden",
            "details": details,
            "code": 403,
        })
    }
}

/// One PolicyRule.
#[derive(Clone, Debug)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
    non_resource_urls: Vec<String>,
}

fn any_of(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

impl Rule {
    fn allows(&self, a: &Attributes) -> bool {
        if !any_of(&self.verbs, &a.verb) {
            return false;
        }
        if !a.is_resource() {
            return self
                .non_resource_urls
                .iter()
                .any(|u| match u.strip_suffix('*') {
                    Some(prefix) => a.path.starts_with(prefix),
                    None => *u == a.path,
                });
        }
        any_of(&self.groups, &a.group)
            && any_of(&self.resources, &a.resource_with_sub())
            && (self.names.is_empty()
                || a.name
                    .as_deref()
                    .is_some_and(|n| self.names.iter().any(|x| x == n)))
    }
}

/// A Role (namespace set) or a ClusterRole (none).
#[derive(Clone, Debug)]
struct Role {
    name: String,
    namespace: Option<String>,
    rules: Vec<Rule>,
}

/// A RoleBinding (namespace set) or a ClusterRoleBinding (none).
#[derive(Clone, Debug)]
struct Binding {
    namespace: Option<String>,
    /// `User`/`Group`/`ServiceAccount`, name, namespace (service accounts only).
    subjects: Vec<(String, String, Option<String>)>,
    role_kind: String,
    role_name: String,
}

impl Binding {
    fn binds(&self, who: &Identity) -> bool {
        let user = who.user();
        let groups = who.groups();
        self.subjects
            .iter()
            .any(|(kind, name, ns)| match kind.as_str() {
                "ServiceAccount" => {
                    matches!(who, Identity::ServiceAccount { namespace, name: sa, .. }
                if sa == name && Some(namespace) == ns.as_ref().or(self.namespace.as_ref()))
                }
                "User" => *name == user,
                "Group" => groups.contains(name),
                _ => false,
            })
    }
}

/// The Roles, ClusterRoles and their bindings of a set of manifests.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    roles: Vec<Role>,
    bindings: Vec<Binding>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Paths every authenticated user may GET (`system:discovery`, `system:public-info-viewer`).
const DISCOVERY_PATHS: &[&str] = &[
    "/api",
    "/api/*",
    "/apis",
    "/apis/*",
    "/healthz",
    "/livez",
    "/readyz",
    "/version",
    "/version/",
    "/openapi",
    "/openapi/*",
];
/// Paths an anonymous user may GET (`system:public-info-viewer`).
const PUBLIC_PATHS: &[&str] = &["/healthz", "/livez", "/readyz", "/version", "/version/"];

fn path_allowed(patterns: &[&str], path: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => *p == path,
    })
}

impl Policy {
    /// The RBAC objects of a multi-document YAML text; other kinds are skipped.
    pub fn from_yaml(text: &str) -> Result<Policy, String> {
        let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
        let mut policy = Policy::default();
        for doc in docs.iter().filter(|d| !d.is_null()) {
            let kind = doc["kind"].as_str().unwrap_or("");
            let name = doc["metadata"]["name"].as_str().unwrap_or("").to_string();
            let namespace = doc["metadata"]["namespace"].as_str().map(String::from);
            match kind {
                "Role" | "ClusterRole" => {
                    let rules = doc["rules"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| Rule {
                            groups: strings(&r["apiGroups"]),
                            resources: strings(&r["resources"]),
                            verbs: strings(&r["verbs"]),
                            names: strings(&r["resourceNames"]),
                            non_resource_urls: strings(&r["nonResourceURLs"]),
                        })
                        .collect();
                    policy.roles.push(Role {
                        name,
                        namespace: if kind == "Role" { namespace } else { None },
                        rules,
                    });
                }
                "RoleBinding" | "ClusterRoleBinding" => {
                    let subjects = doc["subjects"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| {
                            (
                                s["kind"].as_str().unwrap_or("").to_string(),
                                s["name"].as_str().unwrap_or("").to_string(),
                                s["namespace"].as_str().map(String::from),
                            )
                        })
                        .collect();
                    policy.bindings.push(Binding {
                        namespace: if kind == "RoleBinding" {
                            namespace
                        } else {
                            None
                        },
                        subjects,
                        role_kind: doc["roleRef"]["kind"].as_str().unwrap_or("").to_string(),
                        role_name: doc["roleRef"]["name"].as_str().unwrap_or("").to_string(),
                    });
                }
                _ => {}
            }
        }
        Ok(policy)
    }

    /// [`CHART_RBAC`], read once per process.
    pub fn chart() -> &'static Policy {
        static CHART: OnceLock<Policy> = OnceLock::new();
        CHART.get_or_init(|| {
            let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(CHART_RBAC);
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            Policy::from_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        })
    }

    fn role(&self, kind: &str, name: &str, namespace: Option<&str>) -> Option<&Role> {
        self.roles.iter().find(|r| {
            r.name == name
                && match kind {
                    "ClusterRole" => r.namespace.is_none(),
                    _ => r.namespace.as_deref() == namespace,
                }
        })
    }

    /// Whether `who` may do `a`.
    pub fn allows(&self, who: &Identity, a: &Attributes) -> bool {
        if *who == Identity::Harness {
            return true;
        }
        if !a.is_resource() && a.verb == "get" {
            let defaults = if *who == Identity::Anonymous {
                PUBLIC_PATHS
            } else {
                DISCOVERY_PATHS
            };
            if path_allowed(defaults, &a.path) {
                return true;
            }
        }
        let only = match who {
            Identity::ServiceAccount { roles, .. } => roles.as_ref(),
            _ => None,
        };
        self.bindings
            .iter()
            .filter(|b| only.is_none_or(|o| o.contains(&b.role_name)))
            .filter(|b| b.binds(who))
            // A RoleBinding reaches only requests in its namespace.
            .filter(|b| b.namespace.is_none() || b.namespace == a.namespace)
            .filter_map(|b| self.role(&b.role_kind, &b.role_name, b.namespace.as_deref()))
            .flat_map(|r| &r.rules)
            .any(|rule| rule.allows(a))
    }
}
