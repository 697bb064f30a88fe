{{/* The namespace of the operator, Stowaway and the GefyraClients. */}}
{{- define "gefyra.namespace" -}}
{{- .Values.namespace.name | default .Release.Namespace -}}
{{- end }}

{{/* Labels on every object. */}}
{{- define "gefyra.labels" -}}
app.kubernetes.io/part-of: gefyra
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of component NAME: (dict "name" NAME "context" .) */}}
{{- define "gefyra.selector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
{{- end }}

{{/* The one image holding the operator, Stowaway and the CLI: from global.imageRegistry
     (a mirror) or image.registry when set, by digest when one is set. */}}
{{- define "gefyra.image" -}}
{{- $registry := (.Values.global).imageRegistry | default .Values.image.registry -}}
{{- $repository := .Values.image.repository -}}
{{- if $registry }}{{ $repository = printf "%s/%s" (trimSuffix "/" $registry) $repository }}{{ end -}}
{{- if .Values.image.digest -}}
{{ $repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ $repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{/* A Pod spec's imagePullSecrets: global.imagePullSecrets, then imagePullSecrets. */}}
{{- define "gefyra.imagePullSecrets" -}}
{{- $secrets := concat ((.Values.global).imagePullSecrets | default list) (.Values.imagePullSecrets | default list) -}}
{{- with $secrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A Pod template's metadata for component values C named NAME:
     (dict "component" C "name" NAME "context" .); the labels hold the selector's. */}}
{{- define "gefyra.podMetadata" -}}
labels:
  {{- include "gefyra.labels" .context | nindent 2 }}
  app.kubernetes.io/name: {{ .name }}
  app.kubernetes.io/component: {{ trimPrefix "gefyra-" .name }}
  {{- with .component.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .component.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A container's environment for component values C: RUST_LOG from logLevel, then
     extraEnv. */}}
{{- define "gefyra.env" -}}
{{- with .logLevel }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Scheduling of component values C: priority, spread, node selection. */}}
{{- define "gefyra.scheduling" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
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
{{- end }}
