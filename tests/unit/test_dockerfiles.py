"""Static checks of the images' rules: they fail when a Dockerfile breaks one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "docker"
RUNTIME_STAGES = {"Dockerfile.cpu": "cpu", "Dockerfile.cuda": "cuda"}


def stages(path: Path) -> dict[str, list[str]]:
    """Instructions of each named stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or match.group(1)
            result[current] = [line]
        elif current is not None:
            result[current].append(line)
    return result


def closure(all_stages: dict[str, list[str]], name: str) -> list[str]:
    """A stage's instructions plus those of the stages it is built FROM and COPYs --from."""
    lines = list(all_stages[name])
    base = lines[0].split()[1]
    sources = {base} | set(re.findall(r"--from=(\S+)", " ".join(lines)))
    for source in sources:
        if source in all_stages and source != name:
            lines += closure(all_stages, source)
    return lines


@pytest.mark.parametrize("dockerfile", sorted(RUNTIME_STAGES))
def test_runtime_stage_rules(dockerfile: str) -> None:
    all_stages = stages(DOCKER / dockerfile)
    runtime = all_stages[RUNTIME_STAGES[dockerfile]]
    joined = "\n".join(runtime)
    users = [line.split()[1] for line in runtime if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the runtime stage must end as a non-root user"
    assert any(line.upper().startswith("HEALTHCHECK ") and "/health" in line for line in runtime)
    assert "EXPOSE 80" in joined and "PORT=80" in joined
    assert re.search(r'ENTRYPOINT \["tini", "--"', joined), "tini must be PID 1"
    everything = "\n".join(closure(all_stages, RUNTIME_STAGES[dockerfile])).lower()
    assert "torch" not in everything and "requirements-export" not in everything, "no torch in runtime images"
    for compiler in ("gcc", "g++", "build-essential", "clang"):
        assert compiler not in everything.split(), f"{compiler} in a runtime image"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_base_images_are_pinned(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    defaults = dict(re.findall(r"ARG (\w+)=(\S+)", text))
    for image in re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE):
        image = defaults.get(image.strip("${}"), image)
        if image in stages(DOCKER / dockerfile):
            continue
        assert ":" in image and not image.endswith(":latest"), f"{image} is not pinned to a tag"


@pytest.mark.parametrize("requirements", ["requirements-cpu.txt", "requirements-export.txt"])
def test_python_requirements_are_pinned(requirements: str) -> None:
    lines = [line.strip() for line in (DOCKER / requirements).read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][\w.]*", line), f"{line} is not pinned with =="
    if requirements == "requirements-cpu.txt":
        assert not any(line.startswith("torch") for line in lines)


def test_requirements_match_pyproject() -> None:
    import tomllib

    project = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]
    pinned = {line.split("==")[0].split("[")[0].lower(): line.split("==")[1]
              for line in (DOCKER / "requirements-cpu.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    for requirement in project["dependencies"]:
        match = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]+\])?==(\S+)", requirement)
        if match:
            assert pinned.get(match.group(1).lower()) == match.group(2), f"{requirement} differs in the image"


def test_dockerignore_keeps_models_and_venv_out() -> None:
    ignored = (DOCKER.parent / ".dockerignore").read_text().split()
    assert {".venv", "models", ".git"} <= set(ignored)
