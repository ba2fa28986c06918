{{/* Names, labels and images shared by the templates. */}}

{{- define "cortexflow.operator" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "cortexflow.agent" -}}{{ .Release.Name }}-agent{{- end -}}

{{/* Labels of objects that also carry their selector's labels (name, instance). */}}
{{- define "cortexflow.labels" -}}
app.kubernetes.io/part-of: cortexflow
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "cortexflow.operatorSelector" -}}
app.kubernetes.io/name: cortexflow-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cortexflow.agentSelector" -}}
app.kubernetes.io/name: cortexflow-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cortexflow.image" -}}
{{ .root.Values.image.registry }}/{{ .name }}:{{ default .root.Chart.AppVersion .root.Values.image.tag }}
{{- end -}}

{{- define "cortexflow.pullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Labels of objects without a selector. */}}
{{- define "cortexflow.commonLabels" -}}
{{ include "cortexflow.labels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
