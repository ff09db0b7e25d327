{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "message-dispatcher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the
chart name; fullnameOverride wins.
*/}}
{{- define "message-dispatcher.fullname" -}}
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

{{- define "message-dispatcher.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "message-dispatcher.labels" -}}
helm.sh/chart: {{ include "message-dispatcher.chart" . }}
{{ include "message-dispatcher.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: message-dispatcher
{{- end }}

{{/* Selector labels: stable for the life of a release (Deployment selectors are immutable). */}}
{{- define "message-dispatcher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "message-dispatcher.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "message-dispatcher.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "message-dispatcher.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
registry/repository:tag, or registry/repository@digest when a digest is given; no
registry part when image.registry is empty. No public registry carries the image, so
the defaults (no registry, repository "message-dispatcher") name nothing a node can
pull: refuse them here instead of leaving the pods in ImagePullBackOff.
*/}}
{{- define "message-dispatcher.image" -}}
{{- $image := .Values.image }}
{{- if and (not $image.registry) (eq $image.repository "message-dispatcher") }}
{{- fail "image.registry/image.repository must name an image you built and pushed: see docs/operations.md#building-and-pushing-the-image" }}
{{- end }}
{{- $name := $image.repository }}
{{- with $image.registry }}
{{- $name = printf "%s/%s" (trimSuffix "/" .) $image.repository }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $name $image.digest }}
{{- else }}
{{- printf "%s:%s" $name (default .Chart.AppVersion $image.tag | toString) }}
{{- end }}
{{- end }}

{{/* Name of the Secret the pods read: the existing one or the chart's. */}}
{{- define "message-dispatcher.secretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else }}
{{- include "message-dispatcher.fullname" . }}
{{- end }}
{{- end }}

{{/*
Seconds in a Go duration ("500ms", "15s", "2m", "1h30m", "0"), as a float.
The schema has already checked the syntax.
*/}}
{{- define "message-dispatcher.durationSeconds" -}}
{{- $units := dict "ns" 0.000000001 "us" 0.000001 "µs" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 }}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9.]+(ns|us|µs|ms|s|m|h)" (toString .) -1 }}
{{- $number := regexFind "^[0-9.]+" . | float64 }}
{{- $unit := regexReplaceAll "^[0-9.]+" . "" }}
{{- $total = addf $total (mulf $number (get $units $unit)) }}
{{- end }}
{{- $total }}
{{- end }}

{{/* Effective values of the durations the chart reasons about (binary defaults when unset). */}}
{{- define "message-dispatcher.lockTtlSeconds" -}}
{{- include "message-dispatcher.durationSeconds" (default "15s" .Values.config.DISTRIBUTED_LOCK_TTL) }}
{{- end }}
{{- define "message-dispatcher.shutdownTimeoutSeconds" -}}
{{- include "message-dispatcher.durationSeconds" (default "30s" .Values.config.SHUTDOWN_TIMEOUT) }}
{{- end }}

{{/*
terminationGracePeriodSeconds: a pod must outlive DISTRIBUTED_LOCK_TTL +
SHUTDOWN_TIMEOUT after SIGTERM, so in-flight sends finish and the lease is
released (not merely left to expire) before the kubelet's SIGKILL.
Null computes TTL + SHUTDOWN_TIMEOUT + 15s; an explicit value is checked.
*/}}
{{- define "message-dispatcher.terminationGracePeriodSeconds" -}}
{{- $ttl := include "message-dispatcher.lockTtlSeconds" . | float64 }}
{{- $shutdown := include "message-dispatcher.shutdownTimeoutSeconds" . | float64 }}
{{- $needed := addf $ttl $shutdown }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- addf $needed 15 | ceil | int }}
{{- else }}
{{- $given := .Values.terminationGracePeriodSeconds | int }}
{{- if le (float64 $given) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than DISTRIBUTED_LOCK_TTL + SHUTDOWN_TIMEOUT (%gs)" $given $needed) }}
{{- end }}
{{- $given }}
{{- end }}
{{- end }}

{{/* Render-time checks of settings the binary would reject (or that break HA). */}}
{{- define "message-dispatcher.validate" -}}
{{- $ttl := include "message-dispatcher.lockTtlSeconds" . | float64 }}
{{- $retry := include "message-dispatcher.durationSeconds" (default "2s" .Values.config.LOCK_RETRY_INTERVAL) | float64 }}
{{- if le $ttl (mulf 3 $retry) }}
{{- fail (printf "config.DISTRIBUTED_LOCK_TTL (%gs) must be greater than 3 x config.LOCK_RETRY_INTERVAL (%gs)" $ttl $retry) }}
{{- end }}
{{- $lockEnabled := lower (toString (default "true" .Values.config.DISTRIBUTED_LOCK_ENABLED)) }}
{{- if and (has $lockEnabled (list "false" "0" "no" "off")) (gt (int .Values.replicaCount) 1) }}
{{- fail "config.DISTRIBUTED_LOCK_ENABLED=false is single-replica mode: set replicaCount to 1 (replicas in this mode fence each other out)" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set only one of minAvailable and maxUnavailable" }}
{{- end }}
{{- include "message-dispatcher.validateDispatchConfig" . }}
{{- end }}

{{/* True (non-empty) when a ServiceMonitor is rendered: enabled and the CRD's API is served. */}}
{{- define "message-dispatcher.serviceMonitorRendered" -}}
{{- if and .Values.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{/*
ConfigMap data, shared by the release's ConfigMap and the migration hook's copy.
Values are always strings.
*/}}
{{- define "message-dispatcher.configData" -}}
{{- $config := deepCopy .Values.config }}
{{- if not (hasKey $config "AUTO_MIGRATE") }}
{{- $_ := set $config "AUTO_MIGRATE" (ternary "false" "true" .Values.migration.enabled) }}
{{- end }}
{{- $_ := set $config "SERVER_PORT" (toString .Values.containerPort) }}
{{- range $key := keys $config | sortAlpha }}
{{ $key }}: {{ get $config $key | toString | quote }}
{{- end }}
{{- end }}

{{/* Secret data (base64), non-empty values only. */}}
{{- define "message-dispatcher.secretData" -}}
{{- range $key := keys .Values.secrets | sortAlpha }}
{{- $value := get $.Values.secrets $key }}
{{- if $value }}
{{ $key }}: {{ $value | toString | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Selector of the dispatcher pods only (not the migration Job's or the test's). */}}
{{- define "message-dispatcher.podSelectorLabels" -}}
{{ include "message-dispatcher.selectorLabels" . }}
app.kubernetes.io/component: dispatcher
{{- end }}

{{/*
The `job` label Prometheus gives this release's targets: a ServiceMonitor names the
job after the Service. Override with metrics.prometheusRule.scrapeJob (for example
"kubernetes-pods" when scraping through the prometheus.io annotations).
*/}}
{{- define "message-dispatcher.scrapeJob" -}}
{{- .Values.metrics.prometheusRule.scrapeJob | default (include "message-dispatcher.fullname" .) -}}
{{- end }}

{{/*
The alert rules' grouping: "by (<metrics.prometheusRule.groupBy>, <extra>...)", the
labels that tell one install from another on a shared Prometheus, then any extra
labels the rule keeps. Call with (list $ "instance" ...).
*/}}
{{- define "message-dispatcher.ruleBy" -}}
{{- $labels := (first .).Values.metrics.prometheusRule.groupBy }}
{{- range rest . }}
{{- if not (has . $labels) }}
{{- $labels = append $labels . }}
{{- end }}
{{- end }}
{{- printf "by (%s)" (join ", " $labels) }}
{{- end }}

{{/* The alert rules' joins: "on (<metrics.prometheusRule.groupBy>)". */}}
{{- define "message-dispatcher.ruleOn" -}}
{{- printf "on (%s)" (join ", " .Values.metrics.prometheusRule.groupBy) }}
{{- end }}

{{/* An alert's runbook_url: runbookBaseUrl#<alert name in lower case>. Call with (list $ "AlertName"). */}}
{{- define "message-dispatcher.runbookUrl" -}}
{{- printf "%s#%s" (index . 0).Values.metrics.prometheusRule.runbookBaseUrl (lower (index . 1)) }}
{{- end }}

{{/* Where the pods find the DISPATCH_CONFIG file rendered from dispatchConfig. */}}
{{- define "message-dispatcher.dispatchConfigDir" -}}
/etc/message-dispatcher
{{- end }}
{{- define "message-dispatcher.dispatchConfigPath" -}}
{{- include "message-dispatcher.dispatchConfigDir" . }}/dispatch.toml
{{- end }}

{{/*
The DISPATCH_CONFIG file (TOML) from dispatchConfig, keys as in
deploy/dispatch.example.toml. Strings are written as JSON strings, which are TOML basic
strings too (Go escapes <, > and & as \u003c..., valid in both).
*/}}
{{- define "message-dispatcher.dispatchToml" -}}
# DISPATCH_CONFIG rendered by the Helm chart from dispatchConfig (values.yaml):
# the providers, the lanes that send through them and the routes that pick a lane.
{{- range .Values.dispatchConfig.providers }}

[[provider]]
name = {{ .name | toString | toJson }}
kind = {{ .kind | toString | toJson }}
{{- $provider := . }}
{{- range $key := list "url" "base_url" }}
{{- if hasKey $provider $key }}
{{ $key }} = {{ get $provider $key | toString | toJson }}
{{- end }}
{{- end }}
token_env = {{ .token_env | toString | toJson }}
{{- range $key := list "account_sid" "messaging_service_sid" "api_key" "from" "public_url" "breaker_cooldown" }}
{{- if hasKey $provider $key }}
{{ $key }} = {{ get $provider $key | toString | toJson }}
{{- end }}
{{- end }}
{{- if hasKey . "breaker_failures" }}
breaker_failures = {{ int64 .breaker_failures }}
{{- end }}
{{- if hasKey . "breaker_ratio" }}
breaker_ratio = {{ printf "%f" (float64 .breaker_ratio) }}
{{- end }}
{{- if hasKey . "auth_header" }}
auth_header = {{ .auth_header | toString | toJson }}
{{- end }}
{{- if hasKey . "timeout" }}
timeout = {{ .timeout | toString | toJson }}
{{- end }}
{{- if hasKey . "ca_cert" }}
ca_cert = {{ .ca_cert | toString | toJson }}
{{- end }}
{{- if hasKey . "insecure_skip_verify" }}
insecure_skip_verify = {{ .insecure_skip_verify }}
{{- end }}
{{- if hasKey . "price_per_segment" }}
{{- if kindIs "map" .price_per_segment }}
price_per_segment = { {{- range $i, $key := keys .price_per_segment | sortAlpha }}{{ if $i }},{{ end }} {{ $key | toJson }} = {{ get $provider.price_per_segment $key | float64 | printf "%v" }}{{- end }} }
{{- else }}
price_per_segment = {{ .price_per_segment | float64 | printf "%v" }}
{{- end }}
{{- end }}
{{- end }}
{{- range .Values.dispatchConfig.lanes }}

[[lane]]
name = {{ .name | toString | toJson }}
batch_size = {{ int64 .batch_size }}
interval = {{ .interval | toString | toJson }}
{{- if hasKey . "unit" }}
unit = {{ .unit | toString | toJson }}
{{- end }}
providers = {{ toJson .providers }}
{{- if hasKey . "from" }}
from = {{ .from | toString | toJson }}
{{- end }}
{{- if hasKey . "send_concurrency" }}
send_concurrency = {{ int64 .send_concurrency }}
{{- end }}
{{- if hasKey . "countries" }}
countries = {{ toJson .countries }}
{{- end }}
{{- if hasKey . "quiet_hours" }}
quiet_hours = {{ .quiet_hours | toString | toJson }}
{{- end }}
{{- if hasKey . "daily_spend_cap" }}
daily_spend_cap = {{ .daily_spend_cap | float64 | printf "%v" }}
{{- end }}
{{- end }}
{{- range .Values.dispatchConfig.routes }}

[[route]]
lane = {{ .lane | toString | toJson }}
{{- if hasKey . "countries" }}
countries = {{ toJson .countries }}
{{- end }}
{{- if hasKey . "prefixes" }}
prefixes = {{ toJson .prefixes }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Render-time checks of dispatchConfig the schema cannot express: a lane named
"default", references between the lists, and a source for every provider's token.
*/}}
{{- define "message-dispatcher.validateDispatchConfig" -}}
{{- $dc := .Values.dispatchConfig }}
{{- if $dc.lanes }}
{{- $providers := list }}
{{- range $i, $p := $dc.providers }}
{{- if has $p.name $providers }}
{{- fail (printf "dispatchConfig.providers[%d]: the name %q is used twice" $i $p.name) }}
{{- end }}
{{- $providers = append $providers $p.name }}
{{- $var := $p.token_env }}
{{- $set := false }}
{{- if $.Values.existingSecret }}
{{- $set = true }}
{{- else if get $.Values.secrets $var }}
{{- $set = true }}
{{- end }}
{{- range $.Values.extraEnv }}
{{- if or (eq .name $var) (eq .name (printf "%s_FILE" $var)) }}
{{- $set = true }}
{{- end }}
{{- end }}
{{- if not $set }}
{{- fail (printf "dispatchConfig.providers[%d] %q: token_env %s is set by nothing in the pods: put the token in secrets.%s, in existingSecret, or name it in extraEnv (values.yaml, dispatchConfig)" $i $p.name $var $var) }}
{{- end }}
{{- end }}
{{- $lanes := list }}
{{- range $i, $l := $dc.lanes }}
{{- if has $l.name $lanes }}
{{- fail (printf "dispatchConfig.lanes[%d]: the name %q is used twice" $i $l.name) }}
{{- end }}
{{- $lanes = append $lanes $l.name }}
{{- range $l.providers }}
{{- if not (has . $providers) }}
{{- fail (printf "dispatchConfig.lanes[%d] %q: providers: no provider is named %q" $i $l.name .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (has "default" $lanes) }}
{{- fail "dispatchConfig.lanes: no lane is named \"default\"; messages that no route matches go there" }}
{{- end }}
{{- range $i, $r := $dc.routes }}
{{- if not (has $r.lane $lanes) }}
{{- fail (printf "dispatchConfig.routes[%d]: no lane is named %q" $i $r.lane) }}
{{- end }}
{{- end }}
{{- range $.Values.extraEnv }}
{{- if eq .name "DISPATCH_CONFIG" }}
{{- fail "extraEnv: DISPATCH_CONFIG is set by the chart from dispatchConfig; leave it out" }}
{{- end }}
{{- end }}
{{- else if or $dc.providers $dc.routes }}
{{- fail "dispatchConfig: providers and routes need lanes (one of them named \"default\"); without lanes no DISPATCH_CONFIG file is rendered" }}
{{- end }}
{{- end }}
