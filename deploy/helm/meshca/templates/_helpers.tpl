{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "meshca.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of every object: the release name when it contains the chart
name ("meshca" gives deploy/meshca), else <release>-<chart>.
*/}}
{{- define "meshca.fullname" -}}
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

{{- define "meshca.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "meshca.labels" -}}
helm.sh/chart: {{ include "meshca.chart" . }}
{{ include "meshca.selectorLabels" . }}
app.kubernetes.io/version: {{ include "meshca.imageTag" . | quote }}
app.kubernetes.io/component: ca
app.kubernetes.io/part-of: meshca
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the server's pods. Never change them: a Deployment's
selector is immutable.
*/}}
{{- define "meshca.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshca.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "meshca.serviceAccountName" -}}
{{- default (include "meshca.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "meshca.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "meshca.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "meshca.imageTag" .) }}
{{- end }}
{{- end }}

{{/*
The directory of the server's emptyDir: its data directory (bundle.pem)
and admin socket. The CA state itself is in the state Secret.
*/}}
{{- define "meshca.runDir" -}}
/var/run/meshca
{{- end }}

{{/*
The server's config file, meshca-server's Config (cmd/meshca-server/config.go).
Unknown fields are refused by the server, so every field here must exist there.
*/}}
{{- define "meshca.config" -}}
{{- $fullname := include "meshca.fullname" . -}}
{{- $ns := .Release.Namespace -}}
trustDomain: {{ .Values.trustDomain | quote }}
listenAddress: {{ printf "0.0.0.0:%d" (int .Values.grpcPort) | quote }}
{{- if .Values.metrics.enabled }}
metricsAddress: {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
{{- else }}
metricsAddress: "off"
{{- end }}
{{- if .Values.healthPort }}
healthAddress: {{ printf "0.0.0.0:%d" (int .Values.healthPort) | quote }}
{{- end }}
dataDir: {{ include "meshca.runDir" . }}
adminSocket: {{ include "meshca.runDir" . }}/admin.sock
logLevel: {{ .Values.logLevel }}
{{- $auth := .Values.authority }}
{{- $mode := include "meshca.authorityMode" . }}
authority:
  {{- if eq $mode "vault" }}
  {{- include "meshca.vault.check" . }}
  {{- $v := default dict $auth.vault }}
  mode: vault
  intermediateTTL: {{ $auth.intermediateTTL | quote }}
  vault:
    address: {{ $v.address | quote }}
    mount: {{ default "pki" $v.mount | quote }}
    {{- with $v.issuer }}
    issuer: {{ . | quote }}
    {{- end }}
    {{- with $v.namespace }}
    namespace: {{ . | quote }}
    {{- end }}
    {{- if $v.ca }}
    caFile: {{ include "meshca.configDir" . }}/{{ include "meshca.vaultCAKey" . }}
    {{- end }}
    {{- with $v.tlsServerName }}
    tlsServerName: {{ . | quote }}
    {{- end }}
    auth:
      kubernetes:
        role: {{ $v.role | quote }}
        mount: {{ default "kubernetes" $v.authMount | quote }}
        {{- with include "meshca.vaultTokenDir" . }}
        tokenFile: {{ . }}/token
        {{- end }}
  {{- else if eq $mode "selfsigned" }}
  mode: selfsigned
  rootTTL: {{ $auth.rootTTL | quote }}
  intermediateTTL: {{ $auth.intermediateTTL | quote }}
  {{- else }}
  {{- fail (printf "authority.mode %q: want selfsigned or vault" $mode) }}
  {{- end }}
leaf:
  defaultTTL: {{ .Values.leaf.defaultTTL | quote }}
  maxTTL: {{ .Values.leaf.maxTTL | quote }}
bundleRefreshHint: {{ .Values.bundleRefreshHint | quote }}
server:
  dnsNames:
    - {{ $fullname }}
    - {{ $fullname }}.{{ $ns }}
    - {{ $fullname }}.{{ $ns }}.svc
    - {{ $fullname }}.{{ $ns }}.svc.{{ .Values.clusterDomain }}
    - localhost
    {{- range .Values.extraDNSNames }}
    - {{ . }}
    {{- end }}
  ipAddresses: ["127.0.0.1"]
kubernetes:
  enabled: true # the in-cluster config
  namespace: {{ $ns }}
  tokenAudiences: {{ toJson .Values.kubernetes.tokenAudiences }}
  stateSecret: {{ .Values.kubernetes.stateSecret }}
  banSecret: {{ .Values.kubernetes.banSecret }}
  leaseName: {{ .Values.kubernetes.leaseName }}
  bundleConfigMap: {{ .Values.kubernetes.bundleConfigMap }}
istio:
  enabled: {{ .Values.istio.enabled }}
  audiences: {{ toJson .Values.istio.audiences }}
linkerd:
  enabled: {{ .Values.linkerd.enabled }}
  audiences: {{ toJson .Values.linkerd.audiences }}
  controlPlaneNamespace: {{ .Values.linkerd.controlPlaneNamespace | quote }}
  clusterDomain: {{ .Values.clusterDomain | quote }}
{{- range $key := list "policy" "limits" "admission" }}
{{- with index $.Values $key }}
{{ $key }}:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- $fed := .Values.federation }}
{{- if or $fed.endpoint.enabled $fed.peers }}
{{- include "meshca.federation.check" . }}
federation:
  {{- if $fed.endpoint.enabled }}
  endpoint:
    listenAddress: {{ printf "0.0.0.0:%d" (int $fed.endpoint.port) | quote }}
    profile: {{ default "https_spiffe" $fed.endpoint.profile }}
  {{- end }}
  {{- with $fed.refreshHint }}
  refreshHint: {{ . | quote }}
  {{- end }}
  {{- with $fed.minRefresh }}
  minRefresh: {{ . | quote }}
  {{- end }}
  {{- with $fed.maxRefresh }}
  maxRefresh: {{ . | quote }}
  {{- end }}
  {{- with $fed.peers }}
  peers:
    {{- range . }}
    - trustDomain: {{ .trustDomain | quote }}
      url: {{ .url | quote }}
      profile: {{ .profile }}
      {{- if eq .profile "https_spiffe" }}
      endpointID: {{ .endpointID | quote }}
      bundleFile: {{ include "meshca.configDir" $ }}/{{ include "meshca.peerBundleKey" .trustDomain }}
      {{- else if .webCA }}
      webCAFile: {{ include "meshca.configDir" $ }}/{{ include "meshca.peerWebCAKey" .trustDomain }}
      {{- end }}
    {{- end }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
Where the config ConfigMap is mounted: config.yaml and the peers' files.
*/}}
{{- define "meshca.configDir" -}}
/etc/meshca
{{- end }}

{{/*
Keys of a federation peer's files in the config ConfigMap, from its trust
domain name (lowercase letters, digits, ".", "-" and "_": all valid in a
key).
*/}}
{{- define "meshca.peerBundleKey" -}}
{{- printf "peer.%s.bundle" . }}
{{- end }}

{{- define "meshca.peerWebCAKey" -}}
{{- printf "peer.%s.web-ca.pem" . }}
{{- end }}

{{/*
authority.mode, "selfsigned" when unset (values reused from a chart that
had none).
*/}}
{{- define "meshca.authorityMode" -}}
{{- toString (default "selfsigned" .Values.authority.mode) }}
{{- end }}

{{- define "meshca.vaultCAKey" -}}
vault-ca.pem
{{- end }}

{{/*
Where the projected service-account token for Vault is mounted; empty
when there is none (not mode vault, or no tokenAudience: the pod's own
token).
*/}}
{{- define "meshca.vaultTokenDir" -}}
{{- if and (eq (include "meshca.authorityMode" .) "vault") (default dict .Values.authority.vault).tokenAudience -}}
/var/run/secrets/vault
{{- end }}
{{- end }}

{{/*
Checks the Vault values that the chart needs to render them; meshca-server
checks them again, in full, at start.
*/}}
{{- define "meshca.vault.check" -}}
{{- $v := default dict .Values.authority.vault }}
{{- $url := urlParse (toString (default "" $v.address)) }}
{{- if or (not (has $url.scheme (list "https" "http"))) (not $url.host) }}
{{- fail (printf "authority.vault.address %q: want Vault's URL, such as https://vault.vault.svc:8200" (toString (default "" $v.address))) }}
{{- end }}
{{- if not $v.role }}
{{- fail "authority.vault.role is required in mode vault: the Vault role of the Kubernetes auth method the server logs in as" }}
{{- end }}
{{- end }}

{{/*
The port of authority.vault.address (443, or 80 for http, when it names
none), for the NetworkPolicy's egress.
*/}}
{{- define "meshca.vaultPort" -}}
{{- include "meshca.vault.check" . }}
{{- $url := urlParse (default dict .Values.authority.vault).address }}
{{- $port := ternary "80" "443" (eq $url.scheme "http") }}
{{- with regexFind ":[0-9]+$" $url.host }}
{{- $port = trimPrefix ":" . }}
{{- end }}
{{- $port }}
{{- end }}

{{/*
The files the config ConfigMap holds beside config.yaml, as the data of a
ConfigMap (YAML; empty when there are none): each https_spiffe federation
peer's bootstrap bundle, each https_web peer's CA, and Vault's CA.
*/}}
{{- define "meshca.configFiles" -}}
{{- $files := dict }}
{{- if and (eq (include "meshca.authorityMode" .) "vault") (default dict .Values.authority.vault).ca }}
{{- $_ := set $files (include "meshca.vaultCAKey" .) .Values.authority.vault.ca }}
{{- end }}
{{- range .Values.federation.peers }}
{{- if eq .profile "https_spiffe" }}
{{- $_ := set $files (include "meshca.peerBundleKey" .trustDomain) .bundle }}
{{- else if .webCA }}
{{- $_ := set $files (include "meshca.peerWebCAKey" .trustDomain) .webCA }}
{{- end }}
{{- end }}
{{- with $files }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
The ports of the federation peers' URLs (443 when a URL names none), for
the NetworkPolicy's egress, one line each.
*/}}
{{- define "meshca.peerPorts" -}}
{{- $ports := list }}
{{- range .Values.federation.peers }}
{{- $port := "443" }}
{{- with regexFind ":[0-9]+$" (urlParse .url).host }}
{{- $port = trimPrefix ":" . }}
{{- end }}
{{- $ports = append $ports $port }}
{{- end }}
{{- join "\n" (uniq $ports) }}
{{- end }}

{{/*
Checks the federation values and fails with what is wrong; meshca-server
checks them again, in full, at start. The endpoint's profile https_web is
not offered: see the README.
*/}}
{{- define "meshca.federation.check" -}}
{{- $fed := .Values.federation }}
{{- if $fed.endpoint.enabled }}
{{- $profile := toString (default "https_spiffe" $fed.endpoint.profile) }}
{{- if eq $profile "https_web" }}
{{- fail "federation.endpoint.profile https_web is not offered by the chart: meshca-server refuses a key file that group or others can read, and the kubelet makes Secret-mounted files group-readable (0440) under the pod's fsGroup (without it, user 65532 cannot read them at all). Use https_spiffe, or put a TLS-terminating proxy with a Web PKI certificate in front of the endpoint (deploy/helm/meshca/README.md)" }}
{{- else if ne $profile "https_spiffe" }}
{{- fail (printf "federation.endpoint.profile %q: want https_spiffe" $profile) }}
{{- end }}
{{- $port := int $fed.endpoint.port }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "federation.endpoint.port %v: want a port number" $fed.endpoint.port) }}
{{- end }}
{{- $taken := list (int .Values.grpcPort) (int .Values.healthPort) }}
{{- if .Values.metrics.enabled }}
{{- $taken = append $taken (int .Values.metrics.port) }}
{{- end }}
{{- if has $port $taken }}
{{- fail (printf "federation.endpoint.port %d is already one of the server's other ports" $port) }}
{{- end }}
{{- end }}
{{- $seen := dict }}
{{- range $i, $p := $fed.peers }}
{{- $at := printf "federation.peers[%d]" $i }}
{{- $td := toString (default "" $p.trustDomain) }}
{{- $url := toString (default "" $p.url) }}
{{- $profile := toString (default "" $p.profile) }}
{{- if not $td }}
{{- fail (printf "%s: trustDomain is required" $at) }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9._-]+$" $td) }}
{{- fail (printf "%s: trustDomain %q: want a trust domain name (lowercase letters, digits, \".\", \"-\" and \"_\")" $at $td) }}
{{- end }}
{{- if gt (len (include "meshca.peerWebCAKey" $td)) 253 }}
{{- fail (printf "%s: trustDomain %q is too long for a ConfigMap key of its files" $at $td) }}
{{- end }}
{{- if eq $td $.Values.trustDomain }}
{{- fail (printf "%s: trustDomain %q is this server's own" $at $td) }}
{{- end }}
{{- if hasKey $seen $td }}
{{- fail (printf "%s: trust domain %q appears more than once" $at $td) }}
{{- end }}
{{- $_ := set $seen $td true }}
{{- if not (hasPrefix "https://" $url) }}
{{- fail (printf "%s: %s: url %q: want the https URL of the peer's bundle endpoint" $at $td $url) }}
{{- end }}
{{- if eq $profile "https_spiffe" }}
{{- if not $p.endpointID }}
{{- fail (printf "%s: %s: profile https_spiffe needs endpointID, the SPIFFE ID the endpoint presents (a meshca peer's is spiffe://%s/meshca/server)" $at $td $td) }}
{{- end }}
{{- if not $p.bundle }}
{{- fail (printf "%s: %s: profile https_spiffe needs bundle, the peer's bundle obtained out of band, PEM or SPIFFE JSON (--set-file %s.bundle=<file>)" $at $td $at) }}
{{- end }}
{{- if $p.webCA }}
{{- fail (printf "%s: %s: webCA is for profile https_web" $at $td) }}
{{- end }}
{{- else if eq $profile "https_web" }}
{{- if or $p.endpointID $p.bundle }}
{{- fail (printf "%s: %s: endpointID and bundle are for profile https_spiffe" $at $td) }}
{{- end }}
{{- else }}
{{- fail (printf "%s: %s: profile %q: want https_spiffe or https_web" $at $td $profile) }}
{{- end }}
{{- end }}
{{- end }}
