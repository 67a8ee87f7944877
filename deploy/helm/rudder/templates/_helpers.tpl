{{- define "rudder.name" -}}{{ .Release.Name }}-rudder{{- end -}}
{{- define "rudder.labels" -}}
app.kubernetes.io/name: rudder
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "rudder.selector" -}}
app.kubernetes.io/name: rudder
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
