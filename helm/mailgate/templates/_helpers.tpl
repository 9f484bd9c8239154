{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "mailgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "mailgate.fullname" -}}
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

{{- define "mailgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "mailgate.labels" -}}
helm.sh/chart: {{ include "mailgate.chart" . }}
{{ include "mailgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailgate
{{- end }}

{{/* Labels that select the release's pods (all roles, and the migration Job). */}}
{{- define "mailgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The component the Service routes to: "server" (combined) or "api" (split roles). */}}
{{- define "mailgate.serviceComponent" -}}
{{- if .Values.roles.split }}api{{ else }}server{{ end }}
{{- end }}

{{- define "mailgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The Secret the pods read: the existing one, or the chart-created one. Fails with a clear
message when neither an existing Secret nor the required values are given.
*/}}
{{- define "mailgate.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- $_ := required "mailgate needs a database: set secrets.existingSecret (a Secret with the keys database-url, encryption-key and api-keys) or secrets.databaseUrl (e.g. postgres://user:pass@host:5432/mailgate)" .Values.secrets.databaseUrl }}
{{- $_ := required "mailgate needs an encryption key shared by all pods: set secrets.existingSecret or secrets.encryptionKey (openssl rand -base64 32)" .Values.secrets.encryptionKey }}
{{- $apiKeys := toString .Values.secrets.apiKeys }}
{{- if not (trim $apiKeys) }}
{{- fail (printf "mailgate requires API keys: set secrets.existingSecret (a Secret whose key %s holds the keys file) or secrets.apiKeys (the keys file's content). Run `mailgate keys new --name NAME --role service` (add --tenant TENANT for a key bound to one tenant): it prints the token once, to give to the client, and the [[keys]] entry to put in the file" .Values.secrets.keys.apiKeys) }}
{{- end }}
{{- if not (regexMatch "sha256:[0-9a-fA-F]{64}" $apiKeys) }}
{{- fail "secrets.apiKeys has no entry with hash = \"sha256:<64 hex digits>\": it must hold the keys file ([[keys]] entries as printed by `mailgate keys new`), never a token itself" }}
{{- end }}
{{- include "mailgate.fullname" . }}
{{- end }}
{{- end }}

{{/*
API-key authentication, always on: mailgate runs with auth.mode=keys (it refuses to start
without at least one key) and reads the [[keys]] entries from the file mounted from the Secret.
*/}}
{{- define "mailgate.apiKeysFile" -}}
{{- printf "%s/%s" .Values.apiKeys.mountPath .Values.secrets.keys.apiKeys | clean }}
{{- end }}

{{- define "mailgate.authEnv" -}}
- name: MAILGATE_AUTH__MODE
  value: "keys"
- name: MAILGATE_AUTH__KEYS_FILE
  value: {{ include "mailgate.apiKeysFile" . | quote }}
{{- end }}

{{/* Refuses extra environment that would override the authentication settings. */}}
{{- define "mailgate.checkAuth" -}}
{{- range (concat .Values.extraEnv .Values.roles.api.extraEnv .Values.roles.worker.extraEnv) }}
{{- if hasPrefix "MAILGATE_AUTH__" (toString .name) }}
{{- fail (printf "extraEnv sets %s: the chart always runs mailgate with API keys (MAILGATE_AUTH__MODE=keys, the keys file from secrets.keys.apiKeys); change the keys in the Secret instead" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Not optional: a Secret without the keys file keeps the pod from starting. */}}
{{- define "mailgate.apiKeysVolume" -}}
- name: api-keys
  secret:
    secretName: {{ include "mailgate.secretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.secrets.keys.apiKeys }}
        path: {{ .Values.secrets.keys.apiKeys }}
{{- end }}

{{- define "mailgate.apiKeysMount" -}}
- name: api-keys
  mountPath: {{ .Values.apiKeys.mountPath | clean }}
  readOnly: true
{{- end }}

{{/* Whether the operator relay URL comes from the Secret. */}}
{{- define "mailgate.relayFromSecret" -}}
{{- if or .Values.systemDefault.smtpUrlFromSecret (and (not .Values.secrets.existingSecret) .Values.secrets.systemDefaultSmtpUrl) }}true{{ end }}
{{- end }}

{{/*
Seconds of a humantime duration of one unit ("25s", "2m", "1h"); "" for anything else.
*/}}
{{- define "mailgate.durationSeconds" -}}
{{- $d := toString . | trim }}
{{- if regexMatch "^[0-9]+s$" $d }}{{ trimSuffix "s" $d | int }}
{{- else if regexMatch "^[0-9]+m$" $d }}{{ mul (trimSuffix "m" $d | int) 60 }}
{{- else if regexMatch "^[0-9]+h$" $d }}{{ mul (trimSuffix "h" $d | int) 3600 }}
{{- end }}
{{- end }}

{{/*
Refuses a termination grace period that would cut graceful shutdown short, and a preStop
sleep on clusters that do not have it.
*/}}
{{- define "mailgate.checkGrace" -}}
{{- if and (gt (.Values.lifecycle.preStopSleepSeconds | int) 0) (not (semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version)) }}
{{- fail (printf "lifecycle.preStopSleepSeconds needs Kubernetes 1.30 or newer (this is %s); set it to 0" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- $grace := include "mailgate.durationSeconds" .Values.config.shutdownGrace }}
{{- if $grace }}
{{- $needed := add ($grace | int) (.Values.lifecycle.preStopSleepSeconds | int) }}
{{- if le (.Values.terminationGracePeriodSeconds | int) ($needed | int) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than config.shutdownGrace (%s) plus lifecycle.preStopSleepSeconds (%d), or Kubernetes kills mailgate before in-flight deliveries finish" (.Values.terminationGracePeriodSeconds | int) .Values.config.shutdownGrace (.Values.lifecycle.preStopSleepSeconds | int)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pod-level environment that is not in the ConfigMap: secrets and per-role switches. */}}
{{- define "mailgate.secretEnv" -}}
- name: MAILGATE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "mailgate.secretName" . }}
      key: {{ .Values.secrets.keys.databaseUrl }}
- name: MAILGATE_ENCRYPTION__KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "mailgate.secretName" . }}
      key: {{ .Values.secrets.keys.encryptionKey }}
- name: MAILGATE_ENCRYPTION__PREVIOUS_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "mailgate.secretName" . }}
      key: {{ .Values.secrets.keys.previousEncryptionKeys }}
      optional: true
{{- if include "mailgate.relayFromSecret" . }}
- name: MAILGATE_SYSTEM_DEFAULT__SMTP_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "mailgate.secretName" . }}
      key: {{ .Values.secrets.keys.systemDefaultSmtpUrl }}
{{- end }}
{{- end }}

{{/* Container security context, pod security context and scratch volumes. */}}
{{- define "mailgate.scratchVolumes" -}}
- name: data
  emptyDir:
    sizeLimit: {{ .Values.storage.dataSizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.storage.tmpSizeLimit }}
{{- end }}

{{- define "mailgate.scratchMounts" -}}
- name: data
  mountPath: /data
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
The Deployments to render, as a YAML list: one "server" (API + delivery engine) by default,
or "api" (delivery off) and "worker" (delivery on) with roles.split=true.
*/}}
{{- define "mailgate.roles" -}}
{{- if .Values.roles.split }}
- component: api
  replicas: {{ .Values.roles.api.replicaCount | int }}
  delivery: false
  resources: {{ default .Values.resources .Values.roles.api.resources | toJson }}
  extraEnv: {{ .Values.roles.api.extraEnv | toJson }}
- component: worker
  replicas: {{ .Values.roles.worker.replicaCount | int }}
  delivery: true
  resources: {{ default .Values.resources .Values.roles.worker.resources | toJson }}
  extraEnv: {{ .Values.roles.worker.extraEnv | toJson }}
{{- else }}
- component: server
  replicas: {{ .Values.replicaCount | int }}
  delivery: true
  resources: {{ .Values.resources | toJson }}
  extraEnv: []
{{- end }}
{{- end }}

{{/* Name of the Deployment of a role component. */}}
{{- define "mailgate.componentName" -}}
{{- $root := index . 0 }}{{ $component := index . 1 }}
{{- if eq $component "server" }}{{ include "mailgate.fullname" $root }}
{{- else }}{{ printf "%s-%s" (include "mailgate.fullname" $root) $component | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
