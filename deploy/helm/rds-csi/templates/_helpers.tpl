{{/*
Names. The standard pattern: the release name when it already contains the chart's name, else
"<release>-<chart>"; `helm install rds-csi` gives rds-csi-controller, rds-csi-node, ... exactly
as in deploy/kubernetes. The Go chart's documented release (`helm install rds-csi
./deploy/helm/rds-csi-driver`) named its objects rds-csi-rds-csi-driver-*, so an upgrade of that
release to this chart never collides with them.
*/}}
{{- define "rds-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rds-csi.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The CSI driver name: fixed, as in the Go driver (CSIDriver, StorageClasses, PVs name it). */}}
{{- define "rds-csi.driverName" -}}
rds.csi.srvlab.io
{{- end }}

{{/*
Labels of every object, and the selector of the controller's or the node plugin's pods. Only
these two: the selectors of deploy/kubernetes are immutable on existing Deployments and
DaemonSets, so the chart does not add Helm's customary labels to them.
Call with (dict "root" $ "component" "controller").
*/}}
{{- define "rds-csi.labels" -}}
app.kubernetes.io/name: {{ include "rds-csi.name" .root }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* "rds" when rds.managementIP names an RDS, else "file" (the embedded file backend). */}}
{{- define "rds-csi.backend" -}}
{{- if .Values.rds.managementIP }}rds{{ else }}file{{ end }}
{{- end }}

{{/* --rds-address: HOST:PORT, an IPv6 literal in brackets. */}}
{{- define "rds-csi.rdsAddress" -}}
{{- if contains ":" .Values.rds.managementIP -}}
[{{ .Values.rds.managementIP }}]:{{ int .Values.rds.sshPort }}
{{- else -}}
{{ .Values.rds.managementIP }}:{{ int .Values.rds.sshPort }}
{{- end }}
{{- end }}

{{/*
--rds-nqn-prefix from rds.nqnPrefix. The Go chart's value is the prefix of managed NQNs,
"nqn.2000-02.com.mikrotik:pvc-" (its node disconnects only NQNs starting so; its controller
names every volume nqn.2000-02.com.mikrotik:<id> whatever the value says). rds-csi-rs takes the
NQN's first part, "nqn.2000-02.com.mikrotik": new volumes get <prefix>:<id>, and nodes connect
and disconnect only <prefix>:... . So ":pvc-" or a trailing ":" is dropped; a value without a
colon is taken as it is.
*/}}
{{- define "rds-csi.nqnPrefix" -}}
{{- regexReplaceAll ":(pvc-)?$" .Values.rds.nqnPrefix "" }}
{{- end }}

{{/*
RUST_LOG from a Go-style logLevel (klog's -v): 4 and above are klog's debug levels and turn on
this driver's debug lines (only its own: other crates stay at info); below 4, info, the driver's
default. Empty when logLevel is not set.
*/}}
{{- define "rds-csi.logFilter" -}}
{{- if not (kindIs "invalid" .) }}
{{- if ge (int .) 4 }}info,rds_csi=debug{{ else }}info{{ end }}
{{- end }}
{{- end }}

{{/* "repository:tag", the tag defaulting to the chart's appVersion. Call with (list $ .image). */}}
{{- define "rds-csi.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/*
Values the schema lets through (they are the Go chart's) but that ask for something this chart
does not do: rendering fails with what to use instead. README.md lists them.
*/}}
{{- define "rds-csi.validate" -}}
{{- $v := .Values }}
{{- if ($v.controller.vmiSerialization | default dict).enabled }}
{{- fail "controller.vmiSerialization.enabled: the Go driver's per-VMI lock is not supported. rds-csi-rs serializes each volume's operations in its own actor and allows a second node only during a live migration, so KubeVirt needs no lock: remove the key or set it to false." }}
{{- end }}
{{- if ($v.scheduledSnapshots | default dict).enabled }}
{{- fail "scheduledSnapshots.enabled: this chart does not schedule snapshots (the Go chart's kubectl CronJobs). Use a snapshot scheduler such as backube/snapscheduler, or a CronJob of your own, with the VolumeSnapshotClass in snapshotClass.name; then remove the key or set it to false." }}
{{- end }}
{{- range $part := list "controller" "node" }}
{{- $repository := (index $v $part).image.repository }}
{{- if regexMatch "(^|/)3whiskeywhiskey/rds-csi(-driver)?$" $repository }}
{{- fail (printf "%s.image.repository: %s is the Go driver's image, whose flags this chart does not pass. Build this driver's image (the Dockerfile at the repository root), push it, and set %s.image.repository and .tag to it (or remove the key and load the image as rds-csi:%s)." $part $repository $part $.Chart.AppVersion) }}
{{- end }}
{{- end }}
{{- $prefix := include "rds-csi.nqnPrefix" . }}
{{- if not (regexMatch "^nqn\\.[0-9]{4}-[0-9]{2}\\.[a-z0-9.-]+$" $prefix) }}
{{- fail (printf "rds.nqnPrefix: %q is not an NQN prefix. Use the Go chart's form, nqn.YYYY-MM.domain:pvc- (the default, nqn.2000-02.com.mikrotik:pvc-), or nqn.YYYY-MM.domain; the part before the first colon becomes --rds-nqn-prefix." $v.rds.nqnPrefix) }}
{{- end }}
{{- if and $v.snapshotClass.enabled (not $v.sidecars.snapshotter.enabled) }}
{{- fail "snapshotClass.enabled needs sidecars.snapshotter.enabled: without csi-snapshotter no snapshot of the class is ever taken. Turn snapshots off with both set to false." }}
{{- end }}
{{- if and (eq (include "rds-csi.backend" .) "rds") (not $v.rds.secretName) }}
{{- fail "rds.secretName: the RDS backend needs a Secret with the keys rds-private-key and rds-host-key (the Go chart's)." }}
{{- end }}
{{- end }}

{{/*
The Go chart's keys that this chart accepts with no effect, those set in these values: one line
each, "  <key>: <why>", empty when none is. values.yaml sets none of them, so each was set by the
user. NOTES.txt prints them; README.md lists them ("Accepted with no effect").
*/}}
{{- define "rds-csi.goKeysWithoutEffect" -}}
{{- $v := .Values }}
{{- $vmi := $v.controller.vmiSerialization | default dict }}
{{- range $key := list "enabled" "cacheTTL" }}
{{- if hasKey $vmi $key }}
  controller.vmiSerialization.{{ $key }}: the Go driver's per-VMI lock; this driver serializes each volume's operations itself
{{- end }}
{{- end }}
{{- $scheduled := $v.scheduledSnapshots | default dict }}
{{- range $key := list "enabled" "schedules" "image" "resources" }}
{{- if hasKey $scheduled $key }}
  scheduledSnapshots.{{ $key }}: this chart does not schedule snapshots
{{- end }}
{{- end }}
{{- $profiles := include "rds-csi.storageProfiles" . }}
{{- range $sc := $v.storageClasses }}
{{- if and (hasKey $sc "accessModes") (not $profiles) }}
  storageClasses[{{ $sc.name }}].accessModes: a StorageClass has no access modes (with cdi.storageProfiles, ReadWriteMany makes its StorageProfile ReadWriteMany Block)
{{- end }}
{{- end }}
{{- end }}

{{/*
"true" when the CDI StorageProfiles are rendered: cdi.storageProfiles.enabled, the RDS backend
(the only one with StorageClasses), and CDI's StorageProfile API seen in the cluster or
cdi.storageProfiles.forceEnable (as the ServiceMonitor and the Prometheus Operator's CRDs).
*/}}
{{- define "rds-csi.storageProfiles" -}}
{{- $p := .Values.cdi.storageProfiles }}
{{- if and $p.enabled (eq (include "rds-csi.backend" .) "rds") (or $p.forceEnable (.Capabilities.APIVersions.Has "cdi.kubevirt.io/v1beta1/StorageProfile")) }}true{{ end }}
{{- end }}
