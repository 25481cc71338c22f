# The rds-csi image: one binary for the controller and the node plugin (--mode).
#
#   docker build -t rds-csi:0.1.0 .
#
# The build needs no protoc (the CSI proto is compiled by protox, in Rust) and no network
# beyond crates.io. The runtime carries the tools the node plugin runs on the host's devices.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin rds-csi \
    && install -m 0755 target/release/rds-csi /usr/local/bin/rds-csi

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates nvme-cli e2fsprogs xfsprogs util-linux mount \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /etc/nvme/hostnqn /etc/nvme/hostid
# nvme-cli's install generates a host NQN and host id; every node running this image would present
# the same one. The node plugin's DaemonSet mounts the host's /etc/nvme instead, so each node
# connects as itself.
COPY --from=build /usr/local/bin/rds-csi /usr/local/bin/rds-csi
# Non-root by default, as the controller runs; its default --file-root (./volumes) resolves to
# /var/lib/rds-csi/volumes. The node plugin's DaemonSet overrides the user with root, which
# mounting and NVMe need.
RUN install -d -o 65532 -g 65532 /var/lib/rds-csi /var/lib/rds-csi/volumes
WORKDIR /var/lib/rds-csi
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/rds-csi"]
