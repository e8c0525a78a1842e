{{/* Chart name. */}}
{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: RELEASE-switchyard unless overridden. */}}
{{- define "switchyard.fullname" -}}
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

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "switchyard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* etcd client endpoints, comma-separated host:port. */}}
{{- define "switchyard.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- $full := include "switchyard.fullname" . }}
{{- $eps := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $eps = append $eps (printf "%s-etcd-%d.%s-etcd-headless.%s.svc:%d" $full $i $full $.Release.Namespace (int $.Values.etcd.clientPort)) }}
{{- end }}
{{- join "," $eps }}
{{- else }}
{{- if not .Values.store.externalEndpoints }}
{{- fail "etcd.enabled=false needs store.externalEndpoints" }}
{{- end }}
{{- join "," .Values.store.externalEndpoints }}
{{- end }}
{{- end }}

{{/* The --store URL. */}}
{{- define "switchyard.storeUrl" -}}
etcd://{{ include "switchyard.etcdEndpoints" . }}{{ .Values.store.prefix }}
{{- end }}

{{- define "switchyard.adminSecretName" -}}
{{- default (printf "%s-admin" (include "switchyard.fullname" .)) .Values.adminToken.existingSecret }}
{{- end }}

{{- define "switchyard.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "switchyard.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* Flags shared by `switchyard coordinator` and `switchyard worker`: metrics, server TLS (and
     the CA their gRPC clients verify servers with), telemetry.
     Call with (dict "ctx" $ "metricsPort" PORT). */}}
{{- define "switchyard.commonArgs" -}}
{{- $v := .ctx.Values }}
- --metrics-listen=0.0.0.0:{{ .metricsPort }}
{{- if $v.tls.enabled }}
- --tls-cert=/etc/switchyard/tls/tls.crt
- --tls-key=/etc/switchyard/tls/tls.key
- --tls-ca=/etc/switchyard/tls/ca.crt
{{- end }}
{{- if $v.telemetry.otlpEndpoint }}
- --otlp-endpoint={{ $v.telemetry.otlpEndpoint }}
{{- end }}
{{- end }}

{{/* Environment shared by coordinator and worker containers. */}}
{{- define "switchyard.commonEnv" -}}
- name: SWITCHYARD_LOG
  value: {{ .Values.logLevel | quote }}
{{- end }}

{{/* gRPC health probe, or a TCP check with TLS (Kubernetes gRPC probes do not speak TLS).
     Call with (dict "ctx" $ "port" PORT). */}}
{{- define "switchyard.probe" -}}
{{- if .ctx.Values.tls.enabled }}
tcpSocket: {port: {{ .port }}}
{{- else if .service }}
grpc: {port: {{ .port }}, service: {{ .service }}}
{{- else }}
grpc: {port: {{ .port }}}
{{- end }}
{{- end }}

{{/* Volumes shared by coordinator and worker pods: the model and the TLS certificate. */}}
{{- define "switchyard.volumes" -}}
{{- if .Values.model.volume }}
- name: model
  {{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "switchyard.tlsSecretName" . }}
    optional: false
{{- end }}
{{- end }}

{{- define "switchyard.volumeMounts" -}}
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/switchyard/tls
  readOnly: true
{{- end }}
{{- end }}
