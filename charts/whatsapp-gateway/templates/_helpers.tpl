{{- define "wa.fullname" -}}
{{- printf "%s" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- define "wa.labels" -}}
app.kubernetes.io/name: whatsapp-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "wa.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- /*
The gateway StatefulSet's replicas. Without autoscaling, the value. With it, the autoscaler owns
the count: keep what the cluster has now (so an upgrade never resets a scaled StatefulSet), or
start at minReplicas on install.
*/ -}}
{{- define "wa.gatewayReplicas" -}}
{{- $scaling := .Values.gateway.autoscaling -}}
{{- if $scaling.enabled -}}
{{- $current := lookup "apps/v1" "StatefulSet" .Release.Namespace (printf "%s-gateway" (include "wa.fullname" .)) -}}
{{- if and $current $current.spec.replicas -}}
{{- $current.spec.replicas -}}
{{- else -}}
{{- $scaling.minReplicas -}}
{{- end -}}
{{- else -}}
{{- .Values.gateway.replicas -}}
{{- end -}}
{{- end -}}
{{- /* Whether to render a Prometheus Operator object: "auto" follows the cluster's APIs. */ -}}
{{- define "wa.monitoringOn" -}}
{{- $want := index . 0 -}}
{{- $ctx := index . 1 -}}
{{- if or (eq (toString $want) "true") (and (eq (toString $want) "auto") ($ctx.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
true
{{- end -}}
{{- end -}}
{{- /* Scale up as the HPA likes; scale down one shard at a time, slowly (each one is a drain). */ -}}
{{- define "wa.scaleBehavior" -}}
{{- $down := .Values.gateway.autoscaling.scaleDown -}}
scaleDown:
  stabilizationWindowSeconds: {{ $down.stabilizationWindowSeconds }}
  policies:
    - type: Pods
      value: {{ $down.podsPerPeriod }}
      periodSeconds: {{ $down.periodSeconds }}
{{- end -}}
