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
{{- end }}

{{/* Selector labels of component NAME: (dict "name" NAME "context" .) */}}
{{- define "gefyra.selector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
{{- end }}

{{/* The one image holding the operator, Stowaway and the CLI. */}}
{{- define "gefyra.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
