"""docker-compose.yml, rendered as compose reads it (``podman-compose config``; with ``--dry-run`` it needs no
podman, so this runs with the rest of the tests): production runs the real CGB unless the ``sim`` profile is asked
for, and publishes no secret."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # podman-compose's own dependency

from cgb_worker.settings import DEFAULT_API_URL, PREFIXES

from .conftest import communicate

ROOT = Path(__file__).resolve().parent.parent
PODMAN_COMPOSE = Path(sys.executable).parent / "podman-compose"
SIM_SERVICES = ["sim-redis", "sim-webhooks", "sim-worker", "simulator"]


async def compose_config(where: Path, *args: str, **env: str) -> dict[str, Any]:
    """The file as compose resolves it, from a directory of its own (a developer's .env is not read), with a
    podman that does not exist: rendering needs none."""
    shutil.copy(ROOT / "docker-compose.yml", where / "docker-compose.yml")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    proc = await asyncio.create_subprocess_exec(
        str(PODMAN_COMPOSE), "--dry-run", "--podman-path", str(where / "no-podman-here"), *args, "config",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=where, env={**clean, **env},
    )  # fmt: skip
    out, err = await communicate(proc, 60)
    assert proc.returncode == 0, err.decode()
    config: dict[str, Any] = yaml.safe_load(out)
    return config


@pytest.mark.parametrize("key", [{}, {"CGB_API_KEY": "1000001.RealLookingKey0123456789"}], ids=["no key", "a key"])
async def test_without_a_profile_the_worker_runs_the_real_cgb_and_no_simulator(
    tmp_path: Path, key: dict[str, str]
) -> None:
    """``CGB_API_KEY=... docker compose up`` resolved to the simulator's URL once (issue 22)."""
    services = (await compose_config(tmp_path, **key))["services"]
    assert sorted(services) == ["redis", "webhooks", "worker"]
    worker, webhooks = services["worker"]["environment"], services["webhooks"]["environment"]
    assert worker["CGB_API_URL"] == DEFAULT_API_URL == "https://app.chatgptbuilder.io/api"
    assert worker["CGB_API_KEY"] == key.get("CGB_API_KEY", "")  # from the shell, or empty: it stops, saying so
    assert (worker["PHONE_HASH_KEY"], webhooks["WABA_APP_SECRET"], webhooks["PHONE_HASH_KEY"]) == ("", "", "")
    assert "sim" not in json.dumps([services["worker"], services["webhooks"]])
    assert worker["REDIS_URL"] == webhooks["REDIS_URL"] == "redis://redis:6379/0"


async def test_a_cgb_api_url_from_the_shell_is_followed(tmp_path: Path) -> None:
    services = (await compose_config(tmp_path, CGB_API_URL="https://cgb.example.test/api"))["services"]
    assert services["worker"]["environment"]["CGB_API_URL"] == "https://cgb.example.test/api"


async def test_the_sim_profile_adds_the_simulator_stack_and_its_url(tmp_path: Path) -> None:
    services = (await compose_config(tmp_path, "--profile", "sim"))["services"]
    assert sorted(services) == sorted(["redis", "webhooks", "worker", *SIM_SERVICES])
    assert all(services[name]["profiles"] == ["sim"] for name in SIM_SERVICES)
    sim_worker = services["sim-worker"]["environment"]
    assert sim_worker["CGB_API_URL"] == "http://simulator:8089/api"
    assert services["simulator"]["command"][-2:] == ["--port", "8089"]
    assert services["worker"]["environment"]["CGB_API_URL"] == DEFAULT_API_URL  # production's is unchanged
    # the simulator's stack reads no production .env and never shares production's Redis
    assert services["sim-worker"]["env_file"] == services["sim-webhooks"]["env_file"] == []
    sim_redis = {services[name]["environment"]["REDIS_URL"] for name in ("sim-worker", "sim-webhooks")}
    assert sim_redis == {"redis://sim-redis:6379/0"}
    assert services["webhooks"]["command"] == services["sim-webhooks"]["command"] == ["cgb-worker", "webhooks"]
    assert services["worker"]["stop_grace_period"] == services["sim-worker"]["stop_grace_period"] == "60s"
    assert "WEBHOOK_ADMIN_PORT" in json.dumps(services["webhooks"]["healthcheck"]["test"])
