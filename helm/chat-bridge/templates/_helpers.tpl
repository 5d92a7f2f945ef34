{{/* Names, labels and the pieces both Deployments share. */}}

{{- define "chat-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Leaves room for the longest suffix ("-backend") within 63 characters. */}}
{{- define "chat-bridge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "chat-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; pass (dict "root" $ "component" "bridge"). */}}
{{- define "chat-bridge.labels" -}}
helm.sh/chart: {{ include "chat-bridge.chart" .root }}
{{ include "chat-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: {{ include "chat-bridge.name" .root }}
{{- end -}}

{{- define "chat-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chat-bridge.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "chat-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chat-bridge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "chat-bridge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret holding JWT_SECRET, BACKEND_TOKEN, OPENAI_API_KEY, TASK_WEBHOOK_SECRET. */}}
{{- define "chat-bridge.secretName" -}}
{{- default (printf "%s-secrets" (include "chat-bridge.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "chat-bridge.redisHost" -}}
{{- printf "%s-redis" (include "chat-bridge.fullname" .) -}}
{{- end -}}

{{- define "chat-bridge.backendUrl" -}}
{{- printf "http://%s-backend:%v" (include "chat-bridge.fullname" .) .Values.backend.service.port -}}
{{- end -}}

{{/*
An env value as the services parse it. Helm holds every number as a float64 and prints a large
one as 2.592e+06, which int() refuses: whole numbers are printed as integers. Lists are joined
with commas (the services' list syntax).
*/}}
{{- define "chat-bridge.envValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq . (floor .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if kindIs "slice" . -}}
{{- join "," . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* REDIS_URL for both services: the in-cluster Redis, or the external one from a Secret. */}}
{{- define "chat-bridge.redisEnv" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_URL
  value: {{ printf "redis://%s:%v/0" (include "chat-bridge.redisHost" .) .Values.redis.port | quote }}
{{- else if .Values.redis.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- else if .Values.redis.url }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "chat-bridge.fullname" . }}-redis-url
      key: REDIS_URL
{{- else }}
{{- fail "redis.enabled=false needs redis.url or redis.existingSecret" }}
{{- end }}
{{- end -}}

{{/* One secretKeyRef env entry; pass (dict "root" $ "name" "JWT_SECRET" "optional" false). */}}
{{- define "chat-bridge.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "chat-bridge.secretName" .root }}
      key: {{ .name }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{/* The settings of values <component>.env that are not "" (unset: the service's default). */}}
{{- define "chat-bridge.settingsEnv" -}}
{{- range $name, $value := . }}
{{- if not (and (kindIs "string" $value) (eq $value "")) }}
- name: {{ $name }}
  value: {{ include "chat-bridge.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The pod template parts both services share; pass (dict "root" $ "component" "bridge"). */}}
{{- define "chat-bridge.podAnnotations" -}}
{{- $values := index .root.Values .component -}}
checksum/secrets: {{ include (print .root.Template.BasePath "/secrets.yaml") .root | sha256sum }}
{{- if .root.Values.monitoring.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ $values.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with $values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Probes on the container's named port "http". */}}
{{- define "chat-bridge.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  {{- toYaml .liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  {{- toYaml .readiness | nindent 2 }}
{{- end -}}

{{- define "chat-bridge.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
