//! Runs the tests' fake Kubernetes API server on its own, for trying the driver against a
//! "cluster" by hand:
//!
//! ```sh
//! cargo run --example fake-apiserver -- --port 0 --node node-b --node node-c
//! # prints:  server: http://127.0.0.1:PORT
//! #          token: fake-harness
//! #          kubeconfig: /tmp/fake-apiserver-1234/kubeconfig
//! KUBECONFIG=/tmp/fake-apiserver-1234/kubeconfig kubectl get volumeattachments
//! curl -s http://127.0.0.1:PORT/__fake/calls                      # the call log
//! curl -s -XPOST http://127.0.0.1:PORT/api/v1/nodes -H 'content-type: application/json' \
//!      -H 'authorization: Bearer fake-harness' \
//!      -d '{"metadata":{"name":"node-d"}}'                         # JSON only, as the real one
//! curl -s -XPOST http://127.0.0.1:PORT/__fake/faults -d '{"fail_writes":500}'
//! curl -s -XDELETE http://127.0.0.1:PORT/__fake/faults            # clear faults
//! ```
//!
//! Flags: `--port N` (0: any free port; default 0), `--kubeconfig-dir DIR` (default: a new
//! directory under the system temp dir), `--node NAME` (repeatable: Node objects to create).
//! The API enforces the chart's RBAC: a request without a token is anonymous and refused, the
//! printed token (also in the kubeconfig) may do anything; `/__fake/` needs none.
//! Serves until Ctrl-C.

#[path = "../tests/support/fake_apiserver.rs"]
mod fake_apiserver;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use fake_apiserver::FakeApiServer;

struct Args {
    port: u16,
    kubeconfig_dir: Option<PathBuf>,
    nodes: Vec<String>,
}

fn usage() -> ! {
    eprintln!("usage: fake-apiserver [--port N] [--kubeconfig-dir DIR] [--node NAME]...");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        port: 0,
        kubeconfig_dir: None,
        nodes: vec![],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage())
        };
        match flag.as_str() {
            "--port" => args.port = value().parse().unwrap_or_else(|_| usage()),
            "--kubeconfig-dir" => args.kubeconfig_dir = Some(PathBuf::from(value())),
            "--node" => args.nodes.push(value()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    args
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = parse_args();
    let server = FakeApiServer::start_on(SocketAddr::from(([127, 0, 0, 1], args.port))).await?;
    for node in &args.nodes {
        server
            .create("nodes", serde_json::json!({"metadata": {"name": node}}))
            .map_err(std::io::Error::other)?;
    }
    let dir = args.kubeconfig_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fake-apiserver-{}", std::process::id()))
    });
    let path = server.write_kubeconfig(&dir);
    let mut out = std::io::stdout().lock();
    writeln!(out, "server: {}", server.url())?;
    writeln!(out, "token: {}", fake_apiserver::HARNESS_TOKEN)?;
    writeln!(out, "kubeconfig: {}", path.display())?;
    out.flush()?;
    drop(out);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
