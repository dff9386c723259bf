variable "project_id" {
  type        = string
  description = "GCP project that holds the cluster, registry and buckets."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a GCP project id (6-30 characters: lowercase letters, digits, hyphens)."
  }
}

variable "name" {
  type        = string
  default     = "sft-job"
  description = "Prefix for every resource name (cluster, network, registry, buckets, service accounts)."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters: lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  type        = string
  default     = "us-central1"
  description = "Region of the registry, the buckets, the network and (when location_type is regional) the cluster."
}

variable "zone" {
  type        = string
  default     = "us-central1-a"
  description = "Zone of the GPU and TPU node pools (and of the cluster when location_type is zonal). Pick one that offers your accelerators."

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]-[a-z]$", var.zone))
    error_message = "zone must look like us-central1-a."
  }
}

variable "location_type" {
  type        = string
  default     = "zonal"
  description = "zonal: one control plane zone (cheapest; GKE's free tier covers one zonal cluster). regional: control plane replicated over the region's zones."

  validation {
    condition     = contains(["zonal", "regional"], var.location_type)
    error_message = "location_type must be zonal or regional."
  }
}

variable "release_channel" {
  type        = string
  default     = "REGULAR"
  description = "GKE release channel. TPU v5e and GKE-managed GPU drivers need GKE 1.28+, which every channel serves."

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.release_channel)
    error_message = "release_channel must be RAPID, REGULAR or STABLE."
  }
}

variable "deletion_protection" {
  type        = bool
  default     = true
  description = "Refuse `terraform destroy` of the cluster. Set false (and apply) before tearing the cluster down."
}

variable "master_authorized_networks" {
  type        = map(string)
  description = "CIDR blocks allowed to reach the Kubernetes API (name => CIDR), e.g. { office = \"203.0.113.0/24\" }. The nodes are private; only these networks can run kubectl."

  validation {
    condition     = length(var.master_authorized_networks) > 0 && alltrue([for c in values(var.master_authorized_networks) : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "master_authorized_networks needs at least one valid CIDR, and 0.0.0.0/0 is refused."
  }
}

variable "network_cidrs" {
  type = object({
    nodes        = string
    pods         = string
    services     = string
    control_zone = string
  })
  default = {
    nodes        = "10.10.0.0/20"
    pods         = "10.16.0.0/14"
    services     = "10.20.0.0/20"
    control_zone = "172.16.0.0/28"
  }
  description = "Address ranges: node subnet, pod and service secondary ranges, and the /28 of the private control plane endpoint."

  validation {
    condition     = alltrue([for c in values(var.network_cidrs) : can(cidrhost(c, 0))]) && endswith(var.network_cidrs.control_zone, "/28")
    error_message = "network_cidrs must be valid CIDRs and control_zone must be a /28."
  }
}

variable "system_machine_type" {
  type        = string
  default     = "e2-standard-4"
  description = "Machine type of the small on-demand pool that runs cluster services (kube-dns, metrics, JobSet controller). Accelerator nodes are tainted, so this pool is required."
}

variable "gpu_pools" {
  type = map(object({
    machine_type      = string
    accelerator       = string
    accelerator_count = number
    max_nodes         = optional(number, 2)
    disk_size_gb      = optional(number, 200)
    local_ssd_count   = optional(number, 0)
  }))
  default = {
    l4   = { machine_type = "g2-standard-8", accelerator = "nvidia-l4", accelerator_count = 1 }
    h100 = { machine_type = "a3-highgpu-8g", accelerator = "nvidia-h100-80gb", accelerator_count = 8, local_ssd_count = 16 }
  }
  description = <<-EOT
    GPU node pools, name => shape. Every pool scales from 0 (an idle pool costs nothing) and GKE
    installs the NVIDIA driver. local_ssd_count > 0 puts ephemeral storage (the pods' /work) on
    the machine's local NVMe SSDs (375 GB each; a3-highgpu-8g has 16) instead of the boot disk.
    Other shapes: { machine_type = "a2-highgpu-1g", accelerator = "nvidia-tesla-a100", accelerator_count = 1 },
    { machine_type = "a2-ultragpu-1g", accelerator = "nvidia-a100-80gb", accelerator_count = 1, local_ssd_count = 1 }.
  EOT

  validation {
    condition     = alltrue([for p in values(var.gpu_pools) : startswith(p.machine_type, lookup(local.gpu_machine_prefix, p.accelerator, "-"))])
    error_message = "Each gpu_pools entry needs accelerator nvidia-l4 (g2-*), nvidia-tesla-a100 (a2-highgpu-*), nvidia-a100-80gb (a2-ultragpu-*) or nvidia-h100-80gb (a3-highgpu-*) on a matching machine_type."
  }

  validation {
    condition     = alltrue([for k, p in var.gpu_pools : can(regex("^[a-z][a-z0-9-]{0,30}$", k)) && contains([1, 2, 4, 8], p.accelerator_count) && p.max_nodes >= 0 && p.local_ssd_count >= 0])
    error_message = "gpu_pools keys must be lowercase names (<= 31 characters), accelerator_count 1, 2, 4 or 8, max_nodes and local_ssd_count >= 0."
  }
}

variable "tpu_pools" {
  type = map(object({
    machine_type = string
    topology     = string
    max_slices   = optional(number, 1)
    disk_size_gb = optional(number, 300)
  }))
  default = {
    v5e-2x4 = { machine_type = "ct5lp-hightpu-8t", topology = "2x4" }
    v5e-4x4 = { machine_type = "ct5lp-hightpu-4t", topology = "4x4" }
  }
  description = <<-EOT
    TPU v5e (tpu-v5-lite-podslice) node pools, name => slice shape. A pool whose topology fits one
    host (ct5lp-hightpu-8t with 2x4, 4t with 2x2, 1t with 1x1) holds up to max_slices single-host
    slices. A larger topology on ct5lp-hightpu-4t is one multi-host slice (chips / 4 hosts,
    placed COMPACT); add one pool per concurrent slice. All pools scale from 0.
  EOT

  validation {
    condition = alltrue([for p in values(var.tpu_pools) :
      contains(["ct5lp-hightpu-1t", "ct5lp-hightpu-4t", "ct5lp-hightpu-8t"], p.machine_type) &&
      contains(["1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"], p.topology)
    ])
    error_message = "tpu_pools: machine_type must be ct5lp-hightpu-1t, -4t or -8t and topology one of the v5e topologies 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16."
  }

  validation {
    # 1t and 8t hosts only make single-host slices of exactly their chip count (1x1, 2x4); 4t hosts
    # make 2x2 alone or any larger topology as chips/4 hosts. A multi-host slice is one whole pool.
    condition = alltrue([for p in values(var.tpu_pools) : (
      endswith(p.machine_type, "-4t")
      ? local._tpu_chips[p.topology] % 4 == 0
      : local._tpu_chips[p.topology] == local.tpu_chips_per_host[p.machine_type]
      ) && (p.max_slices == 1 || local._tpu_chips[p.topology] <= local.tpu_chips_per_host[p.machine_type])
    if contains(keys(local._tpu_chips), p.topology) && contains(keys(local.tpu_chips_per_host), p.machine_type)])
    error_message = "tpu_pools: the topology does not fit the machine type (8t => 2x4, 1t => 1x1, 4t => 2x2 or a multiple of 4 chips), or a multi-host pool asks for max_slices > 1 (use one pool per multi-host slice)."
  }

  validation {
    condition     = alltrue([for k, p in var.tpu_pools : can(regex("^[a-z][a-z0-9-]{0,30}$", k)) && p.max_slices >= 1])
    error_message = "tpu_pools keys must be lowercase names (<= 31 characters) and max_slices >= 1."
  }
}

variable "spot" {
  type        = bool
  default     = true
  description = "Run GPU and TPU nodes as Spot VMs (60-91% cheaper, can be preempted: the job checkpoints on SIGTERM and exits 75, and the Job retries). Set false for on-demand or reserved capacity."
}

variable "k8s_namespace" {
  type        = string
  default     = "sft-job"
  description = "Kubernetes namespace of the job pods (must match k8s/)."
}

variable "k8s_service_account" {
  type        = string
  default     = "sft-job"
  description = "Kubernetes ServiceAccount of the job pods (must match k8s/). Workload Identity maps it to the job's Google service account."
}

variable "checkpoint_noncurrent_days" {
  type        = number
  default     = 7
  description = "Days a deleted or overwritten object (a rotated-out checkpoint, since the buckets are versioned) is kept before the lifecycle rule deletes it for good."

  validation {
    condition     = var.checkpoint_noncurrent_days >= 1
    error_message = "checkpoint_noncurrent_days must be at least 1."
  }
}

variable "checkpoint_expire_days" {
  type        = number
  default     = 30
  description = "Days after an object's customTime that the lifecycle rule deletes it. Only objects carrying customTime are affected: checkpoint sync sets it on checkpoint files, so old checkpoints of finished runs go away while models, adapters and metrics stay."

  validation {
    condition     = var.checkpoint_expire_days >= 1
    error_message = "checkpoint_expire_days must be at least 1."
  }
}

variable "labels" {
  type        = map(string)
  default     = { app = "sft-job", managed-by = "terraform" }
  description = "Labels on every resource that takes them (cost reports group by these)."
}
