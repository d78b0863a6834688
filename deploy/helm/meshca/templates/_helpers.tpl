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
authority:
  mode: selfsigned
  rootTTL: {{ .Values.authority.rootTTL | quote }}
  intermediateTTL: {{ .Values.authority.intermediateTTL | quote }}
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
{{- end }}
