{{/* Chart name, cut to 63 characters (a DNS label). */}}
{{- define "ecomserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" (or just the release when it already holds the chart name), cut to 63 characters. */}}
{{- define "ecomserve.fullname" -}}
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

{{/* "<fullname>-<suffix>", the fullname shortened so that the whole stays within 63 characters.
Call with (dict "root" $ "suffix" "headless"). */}}
{{- define "ecomserve.suffixedName" -}}
{{- $base := include "ecomserve.fullname" .root | trunc (int (sub 62 (len .suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base .suffix }}
{{- end }}

{{- define "ecomserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that identify this release's pods of every kind (server, helm test, reload Job). */}}
{{- define "ecomserve.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "ecomserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of the Triton pods: stable for the life of the release, no chart version. */}}
{{- define "ecomserve.selectorLabels" -}}
{{ include "ecomserve.releaseSelectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/* Labels on every object, without a component. */}}
{{- define "ecomserve.commonLabels" -}}
helm.sh/chart: {{ include "ecomserve.chart" . }}
{{ include "ecomserve.releaseSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ecomserve
{{- end }}

{{/* Labels of the Triton pods and the objects around them. */}}
{{- define "ecomserve.labels" -}}
{{ include "ecomserve.commonLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/* "repository:tag[@digest]" of an image dict; `latest` is refused.
Call with (dict "image" .Values.x.image "defaultTag" "..."). */}}
{{- define "ecomserve.imageRef" -}}
{{- $tag := default .defaultTag .image.tag | toString }}
{{- if or (not $tag) (eq $tag "latest") }}
{{- fail (printf "image %s: pin a tag (got %q); latest is not allowed" .image.repository $tag) }}
{{- end }}
{{- $ref := printf "%s:%s" .image.repository $tag }}
{{- if .image.digest }}
{{- $ref = printf "%s@%s" $ref .image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{- define "ecomserve.image" -}}
{{- include "ecomserve.imageRef" (dict "image" .Values.image "defaultTag" .Chart.AppVersion) }}
{{- end }}

{{- define "ecomserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ecomserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Claim holding the model repository (source pvc). */}}
{{- define "ecomserve.repositoryClaim" -}}
{{- default (include "ecomserve.suffixedName" (dict "root" . "suffix" "models")) .Values.modelRepository.pvc.existingClaim }}
{{- end }}

{{/* Claim holding the catalog index folder (search.indexVolume). */}}
{{- define "ecomserve.indexClaim" -}}
{{- default (include "ecomserve.repositoryClaim" .) .Values.search.indexVolume.existingClaim }}
{{- end }}

{{/* Pod volume of that claim: the repository's own volume when it is the same claim. */}}
{{- define "ecomserve.indexVolumeName" -}}
{{- if and (eq .Values.modelRepository.source "pvc") (eq (include "ecomserve.indexClaim" .) (include "ecomserve.repositoryClaim" .)) }}model-repository{{ else }}catalog-index{{ end }}
{{- end }}

{{/* The spec's search.index_dir that names <mountPath>/catalog_index for both readers: relative when
`ecomserve index --repository <volume>/<pvc.subPath>` resolves it to the mounted folder too (same claim,
subPath beside the repository folder), otherwise absolute. */}}
{{- define "ecomserve.indexDir" -}}
{{- $iv := .Values.search.indexVolume }}
{{- $repo := .Values.modelRepository }}
{{- $relative := printf "%s/catalog_index" (trimPrefix "/" $iv.mountPath) }}
{{- $besideRepository := clean (printf "%s/%s" (dir (default "." $repo.pvc.subPath)) (trimPrefix "/" $iv.mountPath)) }}
{{- if and (eq (include "ecomserve.indexVolumeName" .) "model-repository") $repo.pvc.subPath (eq (clean $iv.subPath) $besideRepository) }}
{{- $relative }}
{{- else }}
{{- printf "%s/catalog_index" $iv.mountPath }}
{{- end }}
{{- end }}

{{/* Whether Triton's model-repository API is on (explicit model control), hence guarded by the admin key. */}}
{{- define "ecomserve.adminKeyEnabled" -}}
{{- if eq .Values.triton.modelControl.mode "explicit" }}true{{ end }}
{{- end }}

{{/* Whether the inference API key is on (apiKey.existingSecret or apiKey.create). */}}
{{- define "ecomserve.apiKeyEnabled" -}}
{{- if or .Values.apiKey.existingSecret .Values.apiKey.create }}true{{ end }}
{{- end }}

{{/* The stub watchdog restarts models through model control, so it needs explicit mode and its key. */}}
{{- define "ecomserve.stubWatchdog" -}}
{{- if and .Values.triton.stubWatchdog.enabled (include "ecomserve.adminKeyEnabled" .) }}true{{ end }}
{{- end }}

{{/* tritonserver flags that ecomserve's supervisor sets itself and refuses in the command it is given
(ecomserve.server.supervise): Triton's HTTP, gRPC and metrics listen on private unix sockets behind the
front, and the front, not Triton, checks the admin key (a key on a command line is readable through /proc). */}}
{{- define "ecomserve.supervisorOwnedFlags" -}}
--http-address --http-port --grpc-address --grpc-port --metrics-address --metrics-port --http-restricted-api --grpc-restricted-protocol --allow-sagemaker --allow-vertex-ai
{{- end }}

{{/* The Triton container's command, as a YAML list: ecomserve's supervisor, which starts the front
process on the public HTTP, gRPC, metrics and HTTP API ports, runs tritonserver (then ecomserve.tritonArgs) on
private unix sockets, restarts either if it dies and, with the stub watchdog, a python model whose stub
died. */}}
{{- define "ecomserve.supervisorCommand" -}}
{{- $ports := .Values.triton.ports }}
{{- $command := list "/opt/ecomserve/venv/bin/python3" "-m" "ecomserve.server.supervise"
  (printf "--repository=%s" (include "ecomserve.repositoryURI" .))
  "--host=0.0.0.0"
  (printf "--http-port=%d" (int $ports.http))
  (printf "--grpc-port=%d" (int $ports.grpc))
  (printf "--metrics-port=%d" (int $ports.metrics))
  (printf "--api-port=%d" (int $ports.api))
  "--work-dir=/tmp/ecomserve" }}
{{- if include "ecomserve.adminKeyEnabled" . }}
{{- $command = append $command (printf "--admin-key-file=%s" (include "ecomserve.adminKeyPath" .)) }}
{{- end }}
{{- if include "ecomserve.apiKeyEnabled" . }}
{{- $command = append $command (include "ecomserve.apiKeyFile" .) }}
{{- end }}
{{- if not (include "ecomserve.stubWatchdog" .) }}
{{- $command = append $command "--no-stub-watchdog" }}
{{- end }}
{{- toYaml (concat $command (list "--" "/opt/tritonserver/bin/tritonserver")) }}
{{- end }}

{{/* Secret holding the admin key: triton.adminKey.existingSecret, or the one the chart creates. */}}
{{- define "ecomserve.adminKeySecret" -}}
{{- default (include "ecomserve.suffixedName" (dict "root" . "suffix" "admin-key")) .Values.triton.adminKey.existingSecret }}
{{- end }}

{{/* Where the admin key is mounted: the supervisor's --admin-key-file and the reload Job's
ECOMSERVE_ADMIN_KEY_FILE name this file; no container gets the key in its environment. */}}
{{- define "ecomserve.adminKeyPath" -}}
/var/run/secrets/ecomserve/admin-key/admin-key
{{- end }}

{{/* The admin key as a file (adminKeyPath): a one-item VolumeMount list and a one-item Volume list
(mode 0440: the pod's user and fsGroup only), for the Triton container and the reload Job. */}}
{{- define "ecomserve.adminKeyMount" -}}
- name: admin-key
  mountPath: {{ dir (include "ecomserve.adminKeyPath" .) }}
  readOnly: true
{{- end }}

{{- define "ecomserve.adminKeyVolume" -}}
- name: admin-key
  secret:
    secretName: {{ include "ecomserve.adminKeySecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.triton.adminKey.secretKey }}
        path: {{ base (include "ecomserve.adminKeyPath" .) }}
{{- end }}

{{/* Secret holding the inference API key: apiKey.existingSecret, or the one the chart creates. */}}
{{- define "ecomserve.apiKeySecret" -}}
{{- default (include "ecomserve.suffixedName" (dict "root" . "suffix" "api-key")) .Values.apiKey.existingSecret }}
{{- end }}

{{/* Where the inference API key is mounted, and the supervisor's flag that names the file. */}}
{{- define "ecomserve.apiKeyPath" -}}
/var/run/secrets/ecomserve/api-key/api-key
{{- end }}

{{- define "ecomserve.apiKeyFile" -}}
--api-key-file={{ include "ecomserve.apiKeyPath" . }}
{{- end }}

{{/* The inference API key as a file (apiKeyPath): a one-item VolumeMount list and a one-item Volume list
(mode 0440: the pod's user and fsGroup only), for the Triton container, helm test and the reload Job. */}}
{{- define "ecomserve.apiKeyMount" -}}
- name: api-key
  mountPath: {{ dir (include "ecomserve.apiKeyPath" .) }}
  readOnly: true
{{- end }}

{{- define "ecomserve.apiKeyVolume" -}}
- name: api-key
  secret:
    secretName: {{ include "ecomserve.apiKeySecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.apiKey.secretKey }}
        path: {{ base (include "ecomserve.apiKeyPath" .) }}
{{- end }}

{{/* What --model-repository points at. With TensorRT engines, /models is the repository assembled by
the init container (links into /models-source and the engine cache). */}}
{{- define "ecomserve.repositoryURI" -}}
{{- $repo := .Values.modelRepository }}
{{- if eq $repo.source "s3" }}{{ $repo.s3.uri }}
{{- else if eq $repo.source "gcs" }}{{ $repo.gcs.uri }}
{{- else }}/models
{{- end }}
{{- end }}

{{/* Fewest pods the Deployment runs. */}}
{{- define "ecomserve.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.minReplicas }}{{ else }}{{ .Values.replicaCount }}{{ end }}
{{- end }}

{{/* SIGTERM comes after preStop; Triton then drains for up to exitTimeoutSeconds. */}}
{{- define "ecomserve.terminationGracePeriodSeconds" -}}
{{- add .Values.shutdown.preStopSleepSeconds .Values.shutdown.exitTimeoutSeconds 15 }}
{{- end }}

{{/* Checks across values that the schema cannot express; fails the render with the key to change. */}}
{{- define "ecomserve.validate" -}}
{{- $repo := .Values.modelRepository }}
{{- if and (eq $repo.source "pvc") (not $repo.pvc.existingClaim) (not $repo.pvc.create) }}
{{- fail "modelRepository.pvc: set existingClaim or create=true (source is pvc)" }}
{{- end }}
{{- if and (eq $repo.source "s3") (not $repo.s3.uri) }}
{{- fail "modelRepository.s3.uri is required when modelRepository.source=s3 (s3://bucket/path)" }}
{{- end }}
{{- if and (eq $repo.source "gcs") (not $repo.gcs.uri) }}
{{- fail "modelRepository.gcs.uri is required when modelRepository.source=gcs (gs://bucket/path)" }}
{{- end }}
{{- if .Values.tensorrt.enabled }}
{{- if not .Values.gpu.enabled }}
{{- fail "tensorrt.enabled needs gpu.enabled: engines are built on the pod's own GPU" }}
{{- end }}
{{- if ne $repo.source "pvc" }}
{{- fail "tensorrt.enabled needs modelRepository.source=pvc (the init container reads the ONNX files from the volume)" }}
{{- end }}
{{- if and (not .Values.tensorrt.cache.existingClaim) (not $repo.pvc.subPath) }}
{{- fail "modelRepository.pvc.subPath must not be empty when the engine cache shares its volume (Triton would see the cache folder as a model)" }}
{{- end }}
{{- end }}
{{- if and (eq .Values.rollout.strategy "reload") (ne .Values.triton.modelControl.mode "explicit") }}
{{- fail "rollout.strategy=reload needs triton.modelControl.mode=explicit (it reloads through the model-control API)" }}
{{- end }}
{{- if and (eq .Values.rollout.strategy "reload") (not .Values.service.headless) }}
{{- fail "rollout.strategy=reload needs service.headless=true (the Job finds every pod through it)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- $iv := .Values.search.indexVolume }}
{{- if $iv.enabled }}
{{- if and (ne $repo.source "pvc") (not $iv.existingClaim) }}
{{- fail (printf "search.indexVolume.existingClaim is required when modelRepository.source=%s (the index folder lives on a volume)" $repo.source) }}
{{- end }}
{{- if eq (include "ecomserve.indexVolumeName" .) "model-repository" }}
{{- $inside := or (not $repo.pvc.subPath) (eq (clean $iv.subPath) (clean $repo.pvc.subPath)) (hasPrefix (printf "%s/" (clean $repo.pvc.subPath)) (clean $iv.subPath)) }}
{{- if $inside }}
{{- fail "search.indexVolume.subPath must lie beside modelRepository.pvc.subPath (which must not be empty), not inside the repository: Triton would take the index folder for a model" }}
{{- end }}
{{- end }}
{{- range list "/models" "/models-source" "/engine-cache" "/tmp" "/dev" "/proc" "/sys" "/opt" "/usr" "/etc" "/var" "/run" "/bin" "/sbin" "/lib" "/lib64" }}
{{- if or (eq $iv.mountPath .) (hasPrefix (printf "%s/" .) $iv.mountPath) }}
{{- fail (printf "search.indexVolume.mountPath %s: choose a folder outside %s (Triton, the chart or the image use it)" $iv.mountPath .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.networkPolicy.enabled .Values.search.milvus.enabled (ne $repo.source "pvc") (not .Values.networkPolicy.extraEgress) }}
{{- fail (printf "search.milvus.enabled limits the pods' egress to DNS and Milvus: with modelRepository.source=%s list the object store in networkPolicy.extraEgress (e.g. [{ports: [{port: 443, protocol: TCP}]}])" $repo.source) }}
{{- end }}
{{- if and .Values.apiKey.existingSecret .Values.apiKey.create }}
{{- fail "apiKey: set existingSecret (a Secret you manage) or create=true (a generated one), not both" }}
{{- end }}
{{- $ports := .Values.triton.ports }}
{{- if ne (len (uniq (list (int $ports.http) (int $ports.grpc) (int $ports.metrics) (int $ports.api)))) 4 }}
{{- fail "triton.ports: http, grpc, metrics and api must be four different ports (the front listens on each)" }}
{{- end }}
{{- $owned := splitList " " (include "ecomserve.supervisorOwnedFlags" .) }}
{{- range .Values.triton.extraArgs }}
{{- $name := first (splitList "=" .) }}
{{- if has $name $owned }}
{{- fail (printf "triton.extraArgs: remove %s: ecomserve's supervisor owns Triton's HTTP, gRPC and metrics endpoints (private unix sockets behind the front, which checks the admin key)" $name) }}
{{- end }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (not $pdb.maxUnavailable) (not (kindIs "string" $pdb.minAvailable)) }}
{{- if ge (int $pdb.minAvailable) (int (include "ecomserve.minReplicas" .)) }}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be below the smallest replica count (%s), or no node could ever be drained" (int $pdb.minAvailable) (include "ecomserve.minReplicas" .)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* tritonserver's arguments, as a YAML list (after ecomserve.supervisorCommand). */}}
{{- define "ecomserve.tritonArgs" -}}
{{- $t := .Values.triton }}
{{- $args := list (printf "--model-repository=%s" (include "ecomserve.repositoryURI" .)) (printf "--model-control-mode=%s" $t.modelControl.mode) }}
{{- if eq $t.modelControl.mode "explicit" }}
{{- $args = append $args "--load-model=*" }}
{{- else if eq $t.modelControl.mode "poll" }}
{{- $args = append $args (printf "--repository-poll-secs=%d" (int $t.modelControl.pollSeconds)) }}
{{- end }}
{{- /* No HTTP, gRPC or metrics address or port, no restricted-API flag: the supervisor puts Triton on
private unix sockets, and the front serves the public ports. */}}
{{- $args = concat $args (list
  "--allow-metrics=true"
  (printf "--allow-gpu-metrics=%t" .Values.gpu.enabled)
  "--allow-cpu-metrics=true"
  "--metrics-config=summary_latencies=true"
  (printf "--metrics-config=summary_quantiles=%s" $t.summaryQuantiles)) }}
{{- if $t.responseCacheBytes }}
{{- $args = append $args (printf "--cache-config=local,size=%d" (int64 $t.responseCacheBytes)) }}
{{- end }}
{{- $args = concat $args (list
  "--strict-readiness=true"
  (printf "--exit-timeout-secs=%d" (int .Values.shutdown.exitTimeoutSeconds))
  (printf "--log-verbose=%d" (int $t.logVerbose))) }}
{{- $args = concat $args $t.extraArgs }}
{{- toYaml $args }}
{{- end }}

{{/* prometheus-adapter rules (the `rules:` list of its config.yaml): the HPA's queue-time metric and
the GPU utilisation fallback. Each value is per pod; Triton's counters are per model. */}}
{{- define "ecomserve.adapterRules" -}}
{{- $q := .Values.autoscaling.queueTime }}
{{- $models := printf "model=~%q" $q.models }}
- seriesQuery: 'nv_inference_queue_duration_us{namespace!="",pod!=""}'
  resources:
    overrides:
      namespace: {resource: namespace}
      pod: {resource: pod}
  name:
    matches: ^nv_inference_queue_duration_us$
    as: {{ $q.metricName }}
  # Queue time per successful request of each model, the worst model on the pod; 0 on a pod
  # without traffic (instead of no value, which would stop the HPA from scaling down).
  metricsQuery: >-
    max by (<<.GroupBy>>) (
    sum by (<<.GroupBy>>, model) (rate(nv_inference_queue_duration_us{<<.LabelMatchers>>,{{ $models }}}[{{ $q.window }}]))
    / (sum by (<<.GroupBy>>, model) (rate(nv_inference_request_success{<<.LabelMatchers>>,{{ $models }}}[{{ $q.window }}])) > 0)
    )
    or
    max by (<<.GroupBy>>) (rate(nv_inference_queue_duration_us{<<.LabelMatchers>>,{{ $models }}}[{{ $q.window }}])) * 0
- seriesQuery: 'nv_gpu_utilization{namespace!="",pod!=""}'
  resources:
    overrides:
      namespace: {resource: namespace}
      pod: {resource: pod}
  name:
    matches: ^nv_gpu_utilization$
    as: {{ .Values.autoscaling.utilization.gpuMetricName }}
  # Triton reports each visible GPU's utilisation as 0..1; the HPA target is in milli-units (800m = 80%).
  metricsQuery: avg by (<<.GroupBy>>) (nv_gpu_utilization{<<.LabelMatchers>>})
{{- end }}
