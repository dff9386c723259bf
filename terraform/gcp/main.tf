# sft-job on GKE: network, cluster with Workload Identity, a system pool, Spot GPU and TPU v5e
# pools that scale from zero, an Artifact Registry repository, data and runs buckets, and the
# job's Google service account bound to the k8s ServiceAccount.

resource "google_project_service" "apis" {
  for_each = toset([
    "artifactregistry.googleapis.com",
    "binaryauthorization.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "iam.googleapis.com",
    "storage.googleapis.com",
  ])
  service            = each.value
  disable_on_destroy = false
}

# ---------------------------------------------------------------------------------------------
# Network: private nodes, Cloud NAT for egress (the Hugging Face Hub, pip), flow logs on.

resource "google_compute_network" "this" {
  name                    = var.name
  auto_create_subnetworks = false
  depends_on              = [google_project_service.apis]
}

# Ingress is closed unless a rule opens it. GKE adds its own rules (control plane to nodes,
# health checks) at priority 1000; this makes the default explicit.
resource "google_compute_firewall" "deny_ingress" {
  name      = "${var.name}-deny-ingress"
  network   = google_compute_network.this.id
  direction = "INGRESS"
  priority  = 65534
  deny {
    protocol = "all"
  }
  source_ranges = ["0.0.0.0/0"]
}

resource "google_compute_subnetwork" "nodes" {
  name                     = "${var.name}-nodes"
  region                   = var.region
  network                  = google_compute_network.this.id
  ip_cidr_range            = var.network_cidrs.nodes
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = var.network_cidrs.pods
  }
  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = var.network_cidrs.services
  }

  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_router" "this" {
  name    = var.name
  region  = var.region
  network = google_compute_network.this.id
}

resource "google_compute_router_nat" "this" {
  name                               = var.name
  router                             = google_compute_router.this.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# ---------------------------------------------------------------------------------------------
# Identities. Nodes get a dedicated service account with the minimum GKE role plus image pulls;
# the job's pods get their own through Workload Identity.

resource "google_service_account" "nodes" {
  account_id   = "${var.name}-nodes"
  display_name = "sft-job GKE nodes"
  depends_on   = [google_project_service.apis]
}

resource "google_project_iam_member" "nodes" {
  project = var.project_id
  role    = "roles/container.defaultNodeServiceAccount"
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_service_account" "job" {
  account_id   = var.name
  display_name = "sft-job training pods (Workload Identity)"
  depends_on   = [google_project_service.apis]
}

# Only pods running as ${var.k8s_namespace}/${var.k8s_service_account} may act as the job account.
resource "google_service_account_iam_member" "job_workload_identity" {
  service_account_id = google_service_account.job.name
  role               = "roles/iam.workloadIdentityUser"
  member             = local.workload_identity_member
  depends_on         = [google_container_cluster.this] # the identity pool exists once a cluster does
}

# ---------------------------------------------------------------------------------------------
# GKE cluster. The default pool is replaced by the pools below.

resource "google_container_cluster" "this" {
  # checkov:skip=CKV_GCP_12: NetworkPolicy is enforced by Dataplane V2 (datapath_provider ADVANCED_DATAPATH); the legacy Calico network_policy block conflicts with it.
  # checkov:skip=CKV_GCP_69: the default pool is removed; every pool below sets workload_metadata_config GKE_METADATA (checked per pool by the same rule).
  # checkov:skip=CKV_GCP_65: Google Groups for RBAC needs a Google Workspace / Cloud Identity domain, which a project may not have; RBAC uses IAM users and the k8s/ Role.
  name                = var.name
  location            = local.location
  deletion_protection = var.deletion_protection
  resource_labels     = var.labels

  network         = google_compute_network.this.id
  subnetwork      = google_compute_subnetwork.nodes.id
  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }
  datapath_provider           = "ADVANCED_DATAPATH" # Dataplane V2: NetworkPolicy enforcement built in
  enable_intranode_visibility = true

  remove_default_node_pool = true
  initial_node_count       = 1

  release_channel {
    channel = var.release_channel
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = var.network_cidrs.control_zone
  }

  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_networks
      content {
        display_name = cidr_blocks.key
        cidr_block   = cidr_blocks.value
      }
    }
  }

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  # Enforced with the project's singleton policy: a default (allow-all) policy changes nothing
  # until you add attestors; then only attested images run.
  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  enable_shielded_nodes = true
  enable_legacy_abac    = false
  logging_service       = "logging.googleapis.com/kubernetes"
  monitoring_service    = "monitoring.googleapis.com/kubernetes"

  # The pools below scale from zero: the cluster autoscaler adds a GPU or TPU node when a job
  # pod is pending and removes it when idle.
  cluster_autoscaling {
    enabled             = false # no node auto-provisioning: the pools below are the shapes
    autoscaling_profile = "OPTIMIZE_UTILIZATION"
  }

  depends_on = [google_project_service.apis, google_project_iam_member.nodes]
}

locals {
  # Shared by every pool: private nodes hardened the same way.
  node_oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"] # access is governed by IAM, not scopes
}

resource "google_container_node_pool" "system" {
  name     = "system"
  cluster  = google_container_cluster.this.id
  location = local.location

  autoscaling {
    total_min_node_count = 1
    total_max_node_count = 3
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.system_machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = 50
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    labels          = { "sft-job/pool" = "system" }
    resource_labels = var.labels
    metadata        = { disable-legacy-endpoints = true } # a bool, so trivy can read it; the API gets "true"

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

resource "google_container_node_pool" "gpu" {
  for_each = var.gpu_pools

  name           = each.key
  cluster        = google_container_cluster.this.id
  location       = local.location
  node_locations = [var.zone]

  initial_node_count = 0
  autoscaling {
    total_min_node_count = 0
    total_max_node_count = each.value.max_nodes
    location_policy      = "ANY"
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = each.value.machine_type
    spot            = var.spot
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = each.value.disk_size_gb
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    labels          = { "sft-job/pool" = each.key }
    resource_labels = var.labels
    metadata        = { disable-legacy-endpoints = true } # a bool, so trivy can read it; the API gets "true"

    # GKE labels the node cloud.google.com/gke-accelerator=<accelerator>, taints it
    # nvidia.com/gpu=present:NoSchedule and installs the driver named here.
    guest_accelerator {
      type  = each.value.accelerator
      count = each.value.accelerator_count
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }

    dynamic "ephemeral_storage_local_ssd_config" {
      for_each = each.value.local_ssd_count > 0 ? [each.value.local_ssd_count] : []
      content {
        local_ssd_count = ephemeral_storage_local_ssd_config.value
      }
    }

    # Image streaming: the multi-GB CUDA image starts before it is fully pulled.
    gcfs_config {
      enabled = true
    }
    gvnic {
      enabled = true # required by A3, faster everywhere
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

resource "google_container_node_pool" "tpu" {
  for_each = local.tpu_pools

  name           = each.key
  cluster        = google_container_cluster.this.id
  location       = local.location
  node_locations = [var.zone]

  # GKE labels the nodes cloud.google.com/gke-tpu-accelerator=tpu-v5-lite-podslice and
  # cloud.google.com/gke-tpu-topology=<topology>, and taints them google.com/tpu.
  initial_node_count = 0
  autoscaling {
    total_min_node_count = 0
    total_max_node_count = each.value.max_nodes
    location_policy      = "ANY"
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }

  # A multi-host slice is one pool whose hosts are placed together with the requested topology.
  dynamic "placement_policy" {
    for_each = each.value.multi_host ? [each.value.topology] : []
    content {
      type         = "COMPACT"
      tpu_topology = placement_policy.value
    }
  }

  node_config {
    machine_type    = each.value.machine_type
    spot            = var.spot
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = each.value.disk_size_gb # the pods' /work emptyDir lives here
    service_account = google_service_account.nodes.email
    oauth_scopes    = local.node_oauth_scopes
    labels          = { "sft-job/pool" = each.key }
    resource_labels = var.labels
    metadata        = { disable-legacy-endpoints = true } # a bool, so trivy can read it; the API gets "true"

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

# ---------------------------------------------------------------------------------------------
# Artifact Registry: <region>-docker.pkg.dev/<project>/<name>/sft-job-{cuda,tpu,cpu}:<TAG>

resource "google_artifact_registry_repository" "images" {
  # checkov:skip=CKV_GCP_84: images hold code and public libraries, not data; Google-managed encryption at rest is kept to avoid a KMS key ring (keys cannot be deleted) for a registry.
  repository_id = var.name
  location      = var.region
  format        = "DOCKER"
  description   = "sft-job images (cuda, tpu, cpu)"

  # A tag names one image forever: a job that ran with :TAG can be rerun with the same bits.
  docker_config {
    immutable_tags = true
  }

  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "delete-untagged-after-7d"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "604800s"
    }
  }
  cleanup_policies {
    id     = "keep-30-most-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 30
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_artifact_registry_repository_iam_member" "nodes_pull" {
  repository = google_artifact_registry_repository.images.name
  location   = google_artifact_registry_repository.images.location
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.nodes.email}"
}

# ---------------------------------------------------------------------------------------------
# Buckets. data: datasets and base models, read-only for jobs. runs: job outputs and checkpoints.
# Both: uniform access, never public, versioned (an overwrite or delete can be undone for
# checkpoint_noncurrent_days), and lifecycle rules that keep checkpoints from piling up.

# Google-managed encryption at rest, not CMEK: a KMS key ring cannot be deleted and the job's data
# is no more sensitive than its images. Add `encryption { default_kms_key_name }` if policy says so.
#trivy:ignore:AVD-GCP-0066
resource "google_storage_bucket" "data" {
  # checkov:skip=CKV_GCP_62: access is recorded by Cloud Audit Logs (enable Data Access logs for storage.googleapis.com); legacy usage logs would need a third bucket.
  name                        = "${var.project_id}-${var.name}-data"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }

  lifecycle_rule {
    action {
      type = "Delete"
    }
    condition {
      days_since_noncurrent_time = var.checkpoint_noncurrent_days
      with_state                 = "ARCHIVED"
    }
  }
  lifecycle_rule {
    action {
      type = "AbortIncompleteMultipartUpload"
    }
    condition {
      age = 1
    }
  }

  depends_on = [google_project_service.apis]
}

# Google-managed encryption at rest, not CMEK: a KMS key ring cannot be deleted and the job's data
# is no more sensitive than its images. Add `encryption { default_kms_key_name }` if policy says so.
#trivy:ignore:AVD-GCP-0066
resource "google_storage_bucket" "runs" {
  # checkov:skip=CKV_GCP_62: access is recorded by Cloud Audit Logs (enable Data Access logs for storage.googleapis.com); legacy usage logs would need a third bucket.
  name                        = "${var.project_id}-${var.name}-runs"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }

  # Old checkpoints, 1: the trainer rotates checkpoints (deletes all but the newest few); with
  # versioning on, a deleted checkpoint lives on as a noncurrent version until this rule runs.
  lifecycle_rule {
    action {
      type = "Delete"
    }
    condition {
      days_since_noncurrent_time = var.checkpoint_noncurrent_days
      with_state                 = "ARCHIVED"
    }
  }
  # Old checkpoints, 2: the checkpoints a finished run leaves behind. Checkpoint sync stamps
  # customTime on checkpoint objects only, so models, adapters and metrics are never touched.
  lifecycle_rule {
    action {
      type = "Delete"
    }
    condition {
      days_since_custom_time = var.checkpoint_expire_days
    }
  }
  # A preempted upload leaves parts behind; nobody resumes an XML multipart upload after a day.
  lifecycle_rule {
    action {
      type = "AbortIncompleteMultipartUpload"
    }
    condition {
      age = 1
    }
  }

  depends_on = [google_project_service.apis]
}

# Least privilege for the job: read data; read, write and delete objects in runs (resume,
# checkpoint rotation). No bucket admin, no IAM, nothing project-wide.
resource "google_storage_bucket_iam_member" "job_data" {
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.job.email}"
}

resource "google_storage_bucket_iam_member" "job_runs" {
  bucket = google_storage_bucket.runs.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.job.email}"
}
