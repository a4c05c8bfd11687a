"""Launch scripts: syntax, and the commands they build, run against stubs.

`gcloud`, `scontrol`, `srun` and `python` are replaced by small scripts on
PATH that record what they were asked to do, so the scripts' quoting and
SLURM arithmetic are checked without a pod or a cluster.
"""

import os
import pathlib
import subprocess

import pytest

_LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"

# Prints each argument on a line of its own, then a separator.
_RECORD_ARGS = '#!/bin/bash\nprintf "%s\\n" "$@"\necho ---\n'


def _stub(folder: pathlib.Path, name: str, body: str) -> None:
  path = folder / name
  path.write_text(body)
  path.chmod(0o755)


def _calls(text: str) -> list[list[str]]:
  return [block.strip("\n").split("\n") for block in text.split("---\n")[:-1]]


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", str(_LAUNCH / script)], check=True)


def test_tpu_pod_run_reaches_every_worker_with_its_flags(tmp_path):
  stubs = tmp_path / "bin"
  stubs.mkdir()
  _stub(stubs, "gcloud", _RECORD_ARGS)
  env = {
    **os.environ,
    "PATH": f"{stubs}:{os.environ['PATH']}",
    "TPU_NAME": "face-v4-32",
    "ZONE": "us-central2-b",
    "PROJECT": "my-project",
  }
  result = subprocess.run(
    [
      "bash",
      str(_LAUNCH / "tpu_pod.sh"),
      "run",
      "configs/steam.py",
      "/mnt/bucket/face run",
      "--config.mesh.shape=(1,-1)",
    ],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  (call,) = _calls(result.stdout)
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "face-v4-32"]
  assert "--worker=all" in call
  assert "--zone=us-central2-b" in call and "--project=my-project" in call
  command = next(arg for arg in call if arg.startswith("--command="))

  # Run the remote command as a worker's shell would, with a stub python3.
  worker = tmp_path / "worker"
  (worker / "face_jax").mkdir(parents=True)
  _stub(stubs, "python3", _RECORD_ARGS)
  remote = subprocess.run(
    ["bash", "-c", command.removeprefix("--command=")],
    cwd=worker,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  assert _calls(remote.stdout) == [
    [
      "-m",
      "face_jax.main",
      "--config=configs/steam.py",
      "--workdir=/mnt/bucket/face run",
      "--config.mesh.distributed=True",
      "--config.mesh.shape=(1,-1)",
    ]
  ]


def _pod_env(stubs: pathlib.Path) -> dict[str, str]:
  return {
    **os.environ,
    "PATH": f"{stubs}:{os.environ['PATH']}",
    "TPU_NAME": "face-v4-32",
    "ZONE": "us-central2-b",
    "PROJECT": "my-project",
  }


def test_tpu_pod_mount_mounts_the_bucket_on_every_worker(tmp_path):
  stubs = tmp_path / "bin"
  stubs.mkdir()
  _stub(stubs, "gcloud", _RECORD_ARGS)
  env = _pod_env(stubs)
  result = subprocess.run(
    ["bash", str(_LAUNCH / "tpu_pod.sh"), "mount", "my-bucket", "/mnt/my b"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  (call,) = _calls(result.stdout)
  assert "--worker=all" in call
  command = next(arg for arg in call if arg.startswith("--command="))

  # A worker where gcsfuse is installed: no install, one mount.
  calls = tmp_path / "calls"
  record = f'#!/bin/bash\necho "$(basename $0) $*" >> {calls}\n'
  for name in ("gcsfuse", "sudo", "apt-get", "curl"):
    _stub(stubs, name, record)
  subprocess.run(
    ["bash", "-c", command.removeprefix("--command=")],
    env=env,
    check=True,
  )
  lines = calls.read_text().splitlines()
  assert lines[0] == "sudo mkdir -p /mnt/my b"
  assert lines[1].startswith("sudo chown ")
  assert lines[2:] == ["gcsfuse --implicit-dirs my-bucket /mnt/my b"]


def test_tpu_pod_run_refuses_a_url_workdir(tmp_path):
  stubs = tmp_path / "bin"
  stubs.mkdir()
  _stub(stubs, "gcloud", _RECORD_ARGS)
  result = subprocess.run(
    ["bash", str(_LAUNCH / "tpu_pod.sh"), "run", "c.py", "gs://b/face"],
    env=_pod_env(stubs),
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2
  assert "gs://b/face is a URL; mount the bucket first" in result.stderr
  assert result.stdout == ""


def test_slurm_gives_each_task_its_process_id(tmp_path):
  stubs = tmp_path / "bin"
  stubs.mkdir()
  # Many names, so that a reader stopping after the first would break the
  # pipe.
  _stub(
    stubs,
    "scontrol",
    '#!/bin/bash\nfor i in $(seq 7 5000); do echo "gpu-0$i"; done\n',
  )
  # Runs the task command twice, as SLURM would on two nodes.
  _stub(
    stubs,
    "srun",
    "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
    'for id in 0 1; do SLURM_PROCID=$id "$@"; done\n',
  )
  _stub(stubs, "python", _RECORD_ARGS)
  env = {
    **os.environ,
    "PATH": f"{stubs}:{os.environ['PATH']}",
    "SLURM_JOB_NODELIST": "gpu-[07-08]",
    "SLURM_JOB_ID": "12345",
    "SLURM_NTASKS": "2",
    "SLURM_SUBMIT_DIR": str(tmp_path),
  }
  env.pop("VENV", None)
  result = subprocess.run(
    [
      "bash",
      str(_LAUNCH / "slurm_gpu.sbatch"),
      "configs/steam.py",
      "/shared/face runs",
      "--config.mesh.shape=(2,-1)",
    ],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  calls = _calls(result.stdout)
  assert len(calls) == 2
  for process_id, call in enumerate(calls):
    assert call == [
      "-m",
      "face_jax.main",
      "--config=configs/steam.py",
      "--workdir=/shared/face runs",
      "--config.mesh.distributed=True",
      # 20000 + 12345 % 20000: the port follows the job id.
      "--config.mesh.coordinator_address=gpu-07:32345",
      "--config.mesh.num_processes=2",
      f"--config.mesh.process_id={process_id}",
      "--config.mesh.shape=(2,-1)",
    ]
