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
{{- /*
Whether to render a Prometheus Operator object of a kind: "auto" follows the cluster's APIs, per
kind (some clusters serve ServiceMonitor without PrometheusRule).
*/ -}}
{{- define "wa.monitoringOn" -}}
{{- $want := index . 0 -}}
{{- $ctx := index . 1 -}}
{{- $kind := index . 2 -}}
{{- if or (eq (toString $want) "true") (and (eq (toString $want) "auto") ($ctx.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind))) -}}
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
{{- /*
The sessions the operator has placed, from its own metrics: only the leader's series (a replica
that lost leadership keeps exporting its last loads), scraped through this release's operator
Service (job = Service name, as the chart's ServiceMonitor scrapes it).
*/ -}}
{{- define "wa.kedaQuery" -}}
{{- with .Values.gateway.autoscaling.keda.query -}}
{{- . -}}
{{- else -}}
{{- $sel := printf "namespace=\"%s\", job=\"%s-operator\"" .Release.Namespace (include "wa.fullname" .) -}}
sum(whatsapp_operator_shard_sessions{ {{- $sel -}} } and on (namespace, pod) (whatsapp_operator_is_leader{ {{- $sel -}} } == 1))
{{- end -}}
{{- end -}}
{{- /* The Redis the binaries use: the configured one, or the chart's own. */ -}}
{{- define "wa.redisUrl" -}}
{{- if .Values.redis.url -}}
{{- .Values.redis.url -}}
{{- else -}}
{{- printf "redis://%s-redis:6379" (include "wa.fullname" .) -}}
{{- end -}}
{{- end -}}
