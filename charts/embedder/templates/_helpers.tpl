{{- define "embedder.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "embedder.fullname" -}}
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

{{- define "embedder.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedder.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "embedder.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "embedder.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: embedder
app.kubernetes.io/part-of: embedroll
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "embedder.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- /* --shutdown-timeout-ms: set, or what the grace period leaves after the drain delay less
a 2 s margin; refused when the drain and the shutdown do not fit in the grace period. */}}
{{- define "embedder.shutdownTimeoutMs" -}}
{{- $grace := mul (int64 .Values.terminationGracePeriodSeconds) 1000 }}
{{- $drain := int64 .Values.embedder.drainDelayMs }}
{{- $shutdown := int64 .Values.embedder.shutdownTimeoutMs }}
{{- if eq $shutdown 0 }}
{{- $shutdown = sub $grace (add $drain 2000) }}
{{- if lt $shutdown 1000 }}
{{- fail (printf "terminationGracePeriodSeconds (%d s) leaves no time for requests to finish after embedder.drainDelayMs (%d ms): make it at least %d" (int64 .Values.terminationGracePeriodSeconds) $drain (add (div (add $drain 2999) 1000) 1)) }}
{{- end }}
{{- else if gt (add $drain $shutdown) $grace }}
{{- fail (printf "embedder.drainDelayMs (%d ms) plus embedder.shutdownTimeoutMs (%d ms) exceed terminationGracePeriodSeconds (%d s): the kubelet would kill requests still running" $drain $shutdown (int64 .Values.terminationGracePeriodSeconds)) }}
{{- end }}
{{- $shutdown }}
{{- end }}
