locals {
  registry = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "cluster_name" {
  description = "GKE cluster name."
  value       = google_container_cluster.this.name
}

output "cluster_location" {
  description = "GKE cluster location (a zone, or the region when location_type is regional)."
  value       = google_container_cluster.this.location
}

output "get_credentials" {
  description = "Command that points kubectl at the cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.this.name} --location ${google_container_cluster.this.location} --project ${var.project_id}"
}

output "registry" {
  description = "Image registry path: push <registry>/sft-job-{cuda,tpu,cpu}:<TAG>."
  value       = local.registry
}

output "data_bucket_uri" {
  description = "Bucket for datasets and base models (jobs read it)."
  value       = google_storage_bucket.data.url
}

output "runs_bucket_uri" {
  description = "Bucket for job outputs and checkpoints (jobs write it)."
  value       = google_storage_bucket.runs.url
}

output "service_account" {
  description = "Google service account of the job pods; annotate the k8s ServiceAccount with iam.gke.io/gcp-service-account=<this>."
  value       = google_service_account.job.email
}

output "tpu_pools" {
  description = "TPU pools: machine type, topology, hosts per slice, chips per host (google.com/tpu per pod)."
  value       = local.tpu_pools
}

output "gpu_pools" {
  description = "GPU pools: the cloud.google.com/gke-accelerator value and GPUs per node."
  value       = { for k, p in var.gpu_pools : k => { accelerator = p.accelerator, count = p.accelerator_count, machine_type = p.machine_type } }
}

output "settings" {
  description = "KEY => value lines `make tf-settings` writes into cluster.local.env, the settings file of `make submit-*` (mk/cluster.mk, cluster.env)."
  value = {
    PROJECT      = var.project_id
    REGION       = var.region
    ZONE         = var.zone
    GKE_CLUSTER  = google_container_cluster.this.name
    KUBE_CONTEXT = "gke_${var.project_id}_${google_container_cluster.this.location}_${google_container_cluster.this.name}"
    REGISTRY     = local.registry
    GCP_SA       = google_service_account.job.email
    DATA_BUCKET  = google_storage_bucket.data.url
    RUNS_BUCKET  = google_storage_bucket.runs.url
  }
}
