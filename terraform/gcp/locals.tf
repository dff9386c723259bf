# Derived values. This file refers only to variables, so tests evaluate it offline with
# `terraform console` (no google provider needed).
locals {
  location = var.location_type == "regional" ? var.region : var.zone

  # GPU accelerator => the machine family that carries it.
  gpu_machine_prefix = {
    "nvidia-l4"         = "g2-"
    "nvidia-tesla-a100" = "a2-highgpu-"
    "nvidia-a100-80gb"  = "a2-ultragpu-"
    "nvidia-h100-80gb"  = "a3-highgpu-"
  }

  # v5e (tpu-v5-lite-podslice): chips per VM of each machine type, and chips of each topology.
  tpu_chips_per_host = { "ct5lp-hightpu-1t" = 1, "ct5lp-hightpu-4t" = 4, "ct5lp-hightpu-8t" = 8 }
  _tpu_chips         = { for t in ["1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"] : t => tonumber(split("x", t)[0]) * tonumber(split("x", t)[1]) }

  tpu_pools = { for name, p in var.tpu_pools : name => {
    machine_type   = p.machine_type
    topology       = p.topology
    disk_size_gb   = p.disk_size_gb
    chips_per_host = local.tpu_chips_per_host[p.machine_type]
    hosts          = local._tpu_chips[p.topology] / local.tpu_chips_per_host[p.machine_type]
    multi_host     = local._tpu_chips[p.topology] > local.tpu_chips_per_host[p.machine_type]
    # A multi-host slice scales atomically between 0 and all its hosts; single-host pools scale
    # one slice (node) at a time up to max_slices.
    max_nodes = (local._tpu_chips[p.topology] > local.tpu_chips_per_host[p.machine_type]
      ? local._tpu_chips[p.topology] / local.tpu_chips_per_host[p.machine_type]
    : p.max_slices)
  } }

  workload_identity_member = "serviceAccount:${var.project_id}.svc.id.goog[${var.k8s_namespace}/${var.k8s_service_account}]"
}
