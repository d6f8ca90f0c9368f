"""The Asset Bundle as the Databricks CLI reads it, without a workspace.

Each target's configuration, merged the way the CLI merges it (databricks.yml, then the files it
includes, then the target's overrides), validates against the CLI's published JSON schema, and a
broken copy is rejected. The CLI's semantic rules that the schema cannot express and that this
bundle depends on are re-stated here from the CLI's source (github.com/databricks/cli, v1.13.0;
the function each follows is named) and checked on every target: production mode needs an
explicit root path, development mode paths name the user, single-node clusters carry the
single-node settings, every variable reference is declared and every variable has a value.
Each rule is also shown to catch a broken copy, so a passing check means something. What only a
real `databricks bundle deploy` can tell (the workspace accepts the node type, the runtime
exists there, permissions) stays unverified here.
"""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, expensive
from packaging.requirements import Requirement

BUNDLE = ROOT / "databricks_jobs" / "databricks.yml"
TARGETS = ("dev", "staging", "prod")
SCHEMA_ENV_VAR = "SERVING_MLOPS_BUNDLE_SCHEMA"  # where the schema is when not in ../shared/databricks/


# --- The merged configuration, as the CLI builds it -----------------------------------------------

def merge(a, b):
    "The CLI's libs/dyn/merge.Merge: maps merge with b winning, sequences concatenate, anything else is b."
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **{k: merge(a[k], v) if k in a else v for k, v in b.items()}}
    if isinstance(a, list) and isinstance(b, list): return a + b
    return a if b is None else b


def files_of(bundle=BUNDLE):
    "databricks.yml and the files its `include` globs name (relative to it, sorted per glob), parsed."
    root = yaml.safe_load(bundle.read_text())
    return [(bundle, root)] + [(p, yaml.safe_load(p.read_text()) or {}) for g in root.get("include") or []
                               for p in sorted(bundle.parent.glob(g))]


def merged(target, bundle=BUNDLE):
    """Configuration of `target`: the includes merged into the root (Root.Merge), then the target's overrides
    (Root.MergeTargetOverrides): bundle, workspace, artifacts, resources, sync, permissions and presets merge;
    a variable's value replaces its default; run_as replaces. The target-only keys (mode, default, ...) stay
    under `targets.<target>`, as a one-target bundle file would have them (the schema has no `bundle.mode`)."""
    (_, root), *included = files_of(bundle)
    config, seen = copy.deepcopy(root), {}
    for path, doc in included:
        for kind, items in (doc.get("resources") or {}).items():  # unique_resource_keys.go: one definition per key
            for key in items or {}:
                assert (kind, key) not in seen, f"{path}: resources.{kind}.{key} is also defined in {seen[kind, key]}"
                seen[kind, key] = path
        config = merge(config, doc)
    targets = config.pop("targets")
    over = targets[target] or {}
    for field in ("bundle", "workspace", "artifacts", "resources", "sync", "permissions", "presets"):
        if field in over: config[field] = merge(config.get(field), over[field])
    for name, value in (over.get("variables") or {}).items():
        if name not in (config.get("variables") or {}):  # validateVariableOverrides
            raise AssertionError(f"{bundle}: targets.{target}.variables.{name}: variable {name} is not defined but is assigned a value")
        config["variables"][name] = {**config["variables"][name], "default": value["default"] if isinstance(value, dict) else value}
    if "run_as" in over: config["run_as"] = over["run_as"]
    config["targets"] = {target: {k: v for k, v in over.items() if k in ("mode", "default", "cluster_id", "compute_id", "git")}}
    return config


def clusters(config):
    "(path, cluster spec) of every cluster the CLI's SingleNodeCluster check visits in jobs."
    for name, job in ((config.get("resources") or {}).get("jobs") or {}).items():
        for i, c in enumerate(job.get("job_clusters") or []):
            yield f"resources.jobs.{name}.job_clusters[{i}].new_cluster", c.get("new_cluster") or {}
        for i, t in enumerate(job.get("tasks") or []):
            for where, task in ((f"tasks[{i}]", t), (f"tasks[{i}].for_each_task.task", (t.get("for_each_task") or {}).get("task") or {})):
                if task.get("new_cluster"): yield f"resources.jobs.{name}.{where}.new_cluster", task["new_cluster"]


def cluster_key_errors(config):
    "job_cluster_key_defined.go: a task's job_cluster_key names one of its job's job_clusters."
    return [f"resources.jobs.{name}: task '{t['task_key']}' uses job_cluster_key '{t['job_cluster_key']}', which is not defined"
            for name, job in ((config.get("resources") or {}).get("jobs") or {}).items() for t in job.get("tasks") or []
            if t.get("job_cluster_key") and t["job_cluster_key"] not in {c["job_cluster_key"] for c in job.get("job_clusters") or []}]


def tasks(config):
    for name, job in ((config.get("resources") or {}).get("jobs") or {}).items():
        for t in job.get("tasks") or []: yield name, t


# --- The JSON schema --------------------------------------------------------------------------------

def schema_path():
    "The CLI's bundle schema: $SERVING_MLOPS_BUNDLE_SCHEMA, the copy in ../shared/databricks/, or `databricks bundle schema`."
    for p in (os.environ.get(SCHEMA_ENV_VAR), ROOT.parent / "shared" / "databricks" / "bundle_schema.json"):
        if p and Path(p).is_file(): return Path(p)
    if shutil.which("databricks"):
        out = subprocess.run(["databricks", "bundle", "schema"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.startswith("{"):
            path = Path(os.environ.get("TMPDIR", "/tmp")) / "serving-mlops-bundle-schema.json"
            path.write_text(out.stdout)
            return path
    pytest.skip(f"no bundle schema: put the CLI's bundle/schema/jsonschema.json in {ROOT.parent / 'shared/databricks/bundle_schema.json'}, "
                f"set {SCHEMA_ENV_VAR}, or install the Databricks CLI (`databricks bundle schema`)")


@pytest.fixture(scope="module")
def validator():
    "A JSON schema validator for the bundle schema; its `pattern`s use \\p{L}, so they run on the `regex` package."
    import regex
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import ValidationError

    def pattern(v, patrn, instance, schema):
        if v.is_type(instance, "string") and not regex.search(patrn, instance):
            yield ValidationError(f"{instance!r} does not match {patrn!r}")
    return validators.extend(Draft202012Validator, {"pattern": pattern})(json.loads(schema_path().read_text()))


def schema_errors(validator, doc):
    from jsonschema.exceptions import best_match
    errors = list(validator.iter_errors(doc))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in [best_match(errors)] if e] if errors else []


@pytest.mark.parametrize("path", [p for p, _ in files_of()], ids=lambda p: p.name)
def test_each_bundle_file_validates_against_the_cli_schema(validator, path):
    assert schema_errors(validator, yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize("target", TARGETS)
def test_each_targets_merged_bundle_validates_against_the_cli_schema(validator, target):
    config = merged(target)
    assert set(config["resources"]["jobs"]) >= {"model_build", "deploy_serving_endpoint", "promote", "monitoring"}  # the includes are in
    assert schema_errors(validator, config) == []


def test_the_schema_validation_rejects_a_broken_bundle(validator):
    config = merged("prod")
    broken = copy.deepcopy(config)
    broken["resources"]["jobs"]["batch_inference"]["schedule"]["pause_status"] = "PAUZED"
    assert "pause_status: 'PAUZED' is not valid" in schema_errors(validator, broken)[0]
    broken = copy.deepcopy(config)
    broken["resources"]["jobs"]["promote"]["job_clusters"][0]["new_cluster"]["num_worker"] = 0
    assert "('num_worker' was unexpected)" in schema_errors(validator, broken)[0]
    broken = copy.deepcopy(config)
    broken["targets"]["prod"]["worksapce"] = {"root_path": "/Workspace/Shared/x"}
    assert "('worksapce' was unexpected)" in schema_errors(validator, broken)[0]


# --- The CLI's semantic rules ------------------------------------------------------------------------

def mode_errors(target, bundle=BUNDLE):
    """bundle/config/mutator/resourcemutator/validate_target_mode.go. production (validateProductionMode): the
    target itself sets workspace.root_path, else an error (only a recommendation when every job has run_as, or a
    service principal deploys: this bundle relies on neither). development (findNonUserPath): a root, file,
    resource, artifact or state path that is set must name the deploying user."""
    raw = yaml.safe_load(bundle.read_text())["targets"][target] or {}
    config, mode = merged(target, bundle), raw.get("mode")
    if mode not in (None, "development", "production"):
        return [f"unsupported value '{mode}' specified for 'mode': must be either 'development' or 'production'"]
    if mode == "production" and not (raw.get("workspace") or {}).get("root_path"):
        return [f"target '{target}' with 'mode: production' must set 'workspace.root_path' to make sure only one copy is deployed"]
    if mode == "development":
        user = ("~/", "${workspace.current_user.userName}", "${workspace.current_user.short_name}")
        return [f"target '{target}': workspace.{k} must start with '~/' or contain the current username when using 'mode: development'"
                for k in ("root_path", "file_path", "resource_path", "artifact_path", "state_path")
                if (config.get("workspace") or {}).get(k) and not any(u in config["workspace"][k] for u in user)]
    return []


def single_node_warnings(config):
    "bundle/config/validate/single_node_cluster.go (showSingleNodeClusterWarning): num_workers 0 needs the single-node settings."
    out = []
    for where, c in clusters(config):
        if c.get("num_workers", 1) != 0 or c.get("is_single_node") is True or c.get("policy_id"): continue
        conf, tags = c.get("spark_conf") or {}, c.get("custom_tags") or {}
        if not (conf.get("spark.databricks.cluster.profile") == "singleNode" and str(conf.get("spark.master", "")).startswith("local")
                and tags.get("ResourceClass") == "SingleNode"):
            out.append(f"{where}: Single node cluster is not correctly configured")
    return out


REFERENCE = re.compile(r"\$\{([^}]*)\}")
NAMESPACES = ("var.", "bundle.", "workspace.", "resources.")  # what the CLI's variable resolution knows


def reference_errors(config):
    "Every ${...} of the configuration (variable defaults included) is a declared variable or a namespace the CLI resolves; every variable has a value."
    declared, errors = config.get("variables") or {}, []
    def walk(value, where):
        if isinstance(value, dict):
            for k, v in value.items(): walk(v, f"{where}.{k}" if where else k)
        elif isinstance(value, list):
            for i, v in enumerate(value): walk(v, f"{where}[{i}]")
        elif isinstance(value, str):
            for ref in REFERENCE.findall(value):
                if not ref.startswith(NAMESPACES): errors.append(f"{where}: unknown reference ${{{ref}}}")
                elif ref.startswith("var.") and ref[4:].split(".")[0].split("[")[0] not in declared:
                    errors.append(f"{where}: ${{{ref}}} refers to a variable that is not declared under 'variables'")
    walk({k: v for k, v in config.items() if k != "targets"}, "")
    errors += [f"variables.{n}: no value assigned to required variable {n}" for n, spec in declared.items()
               if not isinstance(spec, dict) or ("default" not in spec and "lookup" not in spec)]
    return errors


@pytest.mark.parametrize("target", TARGETS)
def test_production_and_development_mode_rules(target):
    assert mode_errors(target) == []


def test_production_deploys_one_copy_under_an_explicit_root_path():
    "The explicit root names no user, so any deployer (CI's principal, a person) updates the one copy; nbs/10_jobs submits to it."
    from serving_mlops.config import get_environment
    from serving_mlops.jobs import bundle_workspace_paths
    assert yaml.safe_load(BUNDLE.read_text())["targets"]["prod"]["mode"] == "production"
    assert bundle_workspace_paths(get_environment("prod"), "anyone@example.com")["root_path"] == "/Workspace/Shared/.bundle/serving-mlops/prod"


def test_the_mode_rules_catch_a_broken_bundle(tmp_path):
    copy_ = tmp_path / "databricks.yml"
    text = BUNDLE.read_text()
    copy_.write_text(re.sub(r"\n      root_path: .*\n", "\n", text))  # production without a root path
    assert "must set 'workspace.root_path'" in mode_errors("prod", copy_)[0]
    copy_.write_text(text.replace("bundle:\n  name: serving-mlops\n", "bundle:\n  name: serving-mlops\nworkspace:\n  root_path: /Workspace/Shared/x\n"))
    assert "workspace.root_path must start with '~/'" in mode_errors("dev", copy_)[0]  # a shared path in development mode
    copy_.write_text(text.replace("mode: production", "mode: prod"))
    assert "unsupported value 'prod' specified for 'mode'" in mode_errors("prod", copy_)[0]  # the schema allows any string there


@pytest.mark.parametrize("target", TARGETS)
def test_clusters_with_no_workers_are_single_node_clusters(target):
    config = merged(target)
    assert [c for _, c in clusters(config) if c.get("num_workers") == 0], "expected single-node clusters (deploy, promote, monitoring)"
    assert single_node_warnings(config) == []


def test_the_single_node_rule_catches_a_broken_cluster():
    config = merged("staging")
    cluster = config["resources"]["jobs"]["monitoring"]["job_clusters"][0]["new_cluster"]
    del cluster["custom_tags"]
    assert single_node_warnings(config) == ["resources.jobs.monitoring.job_clusters[0].new_cluster: Single node cluster is not correctly configured"]
    cluster["is_single_node"] = True  # the other form the CLI accepts (the API wants kind: CLASSIC_PREVIEW with it)
    assert single_node_warnings(config) == []


@pytest.mark.parametrize("target", TARGETS)
def test_every_reference_is_declared_and_every_variable_has_a_value(target):
    assert reference_errors(merged(target)) == []
    assert cluster_key_errors(merged(target)) == []


def test_the_reference_rule_catches_a_broken_bundle():
    config = merged("dev")
    config["resources"]["jobs"]["ingest"]["tasks"][0]["notebook_task"]["base_parameters"]["snapshot_date"] = "${var.snapshot_day}"
    config["variables"]["catalog"] = {"description": "no default, no value"}
    assert reference_errors(config) == [
        "resources.jobs.ingest.tasks[0].notebook_task.base_parameters.snapshot_date: ${var.snapshot_day} refers to a variable that is not declared under 'variables'",
        "variables.catalog: no value assigned to required variable catalog"]
    config["resources"]["jobs"]["ingest"]["tasks"][0]["job_cluster_key"] = "build_cluster"
    assert cluster_key_errors(config) == ["resources.jobs.ingest: task 'ingest' uses job_cluster_key 'build_cluster', which is not defined"]


# --- Job clusters: runtime, node type, what they install --------------------------------------------------

RUNTIME = re.compile(r"^(\d+)\.(\d+)\.x-cpu-ml-scala2\.13$")  # Databricks Runtime ML from 17 on: Spark 4, Scala 2.13 only


@pytest.mark.parametrize("target", TARGETS)
def test_job_clusters_run_one_ml_runtime_with_spark_4_on_the_node_type_variable(target):
    config = merged(target)
    specs = [c for _, c in clusters(config)]
    assert len(specs) == 7
    assert {c["spark_version"] for c in specs} == {"18.0.x-cpu-ml-scala2.13"}  # 18 LTS ML: Spark 4.1, MLflow 3.8.1, FE 0.13.0 (17.3: FE 0.12.1)
    assert all(int(RUNTIME.match(c["spark_version"]).group(1)) >= 17 for c in specs)
    assert {c["node_type_id"] for c in specs} == {"${var.node_type_id}"}
    assert config["variables"]["node_type_id"]["default"] == "Standard_D4ds_v5"  # Azure Databricks, the scenario's cloud


@pytest.fixture(scope="module")
@expensive
def wheel(tmp_path_factory):
    "The wheel `databricks bundle deploy` builds: the artifact's own build command, run on a copy of the project."
    src = tmp_path_factory.mktemp("project")
    for name in ("setup.py", "settings.ini", "README.md"): shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "serving_mlops", src / "serving_mlops", ignore=shutil.ignore_patterns("__pycache__"))
    build = yaml.safe_load(BUNDLE.read_text())["artifacts"]["serving_mlops"]["build"]
    assert build.startswith("python -m pip wheel "), build
    subprocess.run([sys.executable, *build.split()[1:]], cwd=src, check=True, capture_output=True, timeout=300)
    (whl,) = (src / "dist").glob("serving_mlops-*.whl")
    with zipfile.ZipFile(whl) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [Requirement(l.split(":", 1)[1].strip()) for l in metadata.splitlines() if l.startswith("Requires-Dist:")]


def test_the_wheel_forces_no_spark_onto_a_cluster(wheel):
    "What a `whl` library pip-installs on a cluster: no pyspark (the runtime has its own); the local default gets it from the `local` extra."
    always = {r.name for r in wheel if r.marker is None}
    assert "pyspark" not in always and {"mlflow-skinny", "databricks-sdk", "pandas"} <= always
    assert "mlflow" not in always  # the full package would replace the runtime's mlflow-skinny (make replay refuses that)
    (local,) = [r for r in wheel if r.name == "pyspark"]
    assert str(local.marker) == 'extra == "local"' and local.specifier.contains("4.0.0")
    (fe,) = [r for r in wheel if r.name == "databricks-feature-engineering"]
    assert str(fe.marker) == 'extra == "databricks"' and str(fe.specifier) == ">=0.13"


def test_every_task_installs_the_wheel_and_feature_engineering_0_13(wheel):
    "The online-store API needs databricks-feature-engineering 0.13 (18 LTS ML ships 0.13.0, so nothing is upgraded; 17.3 shipped 0.12.1): each task names the databricks extra's version."
    (fe,) = [r for r in wheel if r.name == "databricks-feature-engineering"]
    for target in TARGETS:
        for job, t in tasks(merged(target)):
            libs = t.get("libraries") or []
            assert {"whl": "../../dist/*.whl"} in libs, (job, t["task_key"])
            assert {"pypi": {"package": f"{fe.name}{fe.specifier}"}} in libs, (job, t["task_key"], libs)


def test_a_job_task_imports_nothing_of_the_local_extra(wheel):
    "Issue 26 item 7: a cluster installs the wheel's own requirements only; the modules every task function imports load with the `local` extra's libraries missing (pyspark aside: the runtime has its own)."
    import re
    # pyspark and mlflow aside: the runtime has its own Spark, and its mlflow-skinny is the same `mlflow` module (the wheel requires
    # mlflow-skinny; make replay runs every task on the runtime's own)
    local = [r for r in wheel if r.marker is not None and "local" in str(r.marker) and r.name not in ("pyspark", "mlflow")]
    assert {r.name for r in local} >= {"papermill", "ipykernel", "nbconvert"} and not {r.name for r in local} & {r.name for r in wheel if r.marker is None}
    tasks = (ROOT / "serving_mlops" / "tasks.py").read_text()
    modules = sorted(set(re.findall(r"from (serving_mlops\.[\w.]+) import", tasks))) + ["serving_mlops.tasks"]
    blocked = [r.name.replace("-", "_") for r in local]
    script = (f"import sys, importlib\nfor b in {blocked!r}: sys.modules[b] = None\n"  # importing one raises ImportError
              f"for m in {modules!r}: importlib.import_module(m)\nprint('imported', len({modules!r}))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr[-2000:]
    assert len(modules) >= 8, modules


def test_make_installs_spark_for_the_local_default_and_everything_for_tests():
    "make demo from a fresh clone installs the `local` extra (pyspark); make test installs local, dev and databricks."
    def install_line(target):
        out = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return next(l for l in out.splitlines() if "pip install" in l and " -e " in l)
    assert install_line(".venv/.installed").endswith('-e ".[local]"')
    assert install_line(".venv/.installed-dev").endswith('-e ".[local,dev,databricks]"')


def test_library_and_artifact_paths_name_the_same_dist_wherever_deploy_runs(tmp_path, monkeypatch):
    """The CLI reads a relative path relative to the file that holds it (NormalizePaths, then ExpandGlobReferences from the
    sync root; acceptance test libraries/outside_of_bundle_root), and an artifact's `path` and `files` relative to databricks.yml
    (artifacts.Prepare): every task's `whl` glob and the artifact's files are the dist/ its build writes, whatever the cwd."""
    from serving_mlops.config import get_environment
    from serving_mlops.jobs import load_jobs, workspace_libraries
    artifact = yaml.safe_load(BUNDLE.read_text())["artifacts"]["serving_mlops"]
    dist = (BUNDLE.parent / artifact["path"]).resolve() / "dist"
    assert [(BUNDLE.parent / f["source"]).resolve() for f in artifact["files"]] == [dist / "*.whl"]
    for path, doc in files_of()[1:]:
        for job in ((doc.get("resources") or {}).get("jobs") or {}).values():
            for t in job["tasks"]:
                for lib in t.get("libraries") or []:
                    if "whl" in lib: assert (path.parent / lib["whl"]).resolve() == dist / "*.whl", (path.name, t["task_key"])
    # serving_mlops resolves them the same way, from any working directory
    project = tmp_path / "project"
    shutil.copytree(ROOT / "databricks_jobs", project / "databricks_jobs")
    (project / "dist").mkdir()
    for v in ("0.1.0", "0.1.2"): (project / "dist" / f"serving_mlops-{v}-py3-none-any.whl").touch()
    monkeypatch.chdir(tmp_path)
    env = get_environment("staging", project / "databricks_jobs" / "databricks.yml")
    spec = load_jobs(env)["model_build"]
    assert workspace_libraries(spec, spec.tasks["train"], "/Workspace/x/artifacts")[0] == {"whl": "/Workspace/x/artifacts/.internal/serving_mlops-0.1.2-py3-none-any.whl"}


# --- issue 26 item 1: the values a deployment resolved reach the task's code on the cluster ------------------------------

def test_every_job_cluster_carries_every_variable_as_the_deployment_resolved_it(tmp_path, monkeypatch):
    """`task_environment` (a complex variable: its default may reference other variables, acceptance test
    bundle/variables/complex of the CLI) names every other variable as BUNDLE_VAR_<name>; every job cluster sets it as its
    spark_env_vars. On the cluster, serving_mlops reads BUNDLE_VAR_<name> first, so an override given at deploy time
    (--var, BUNDLE_VAR_) reaches the code although the synced databricks.yml has only the defaults."""
    from serving_mlops.config import get_environment
    from serving_mlops.jobs import load_jobs
    variables = yaml.safe_load(BUNDLE.read_text())["variables"]
    carried = variables["task_environment"]
    assert carried["type"] == "complex"
    assert carried["default"] == {"SERVING_MLOPS_BUNDLE_TARGET": "${bundle.target}",
                                  **{f"BUNDLE_VAR_{n}": f"${{var.{n}}}" for n, v in variables.items() if v.get("type") != "complex"}}
    for target in TARGETS:
        specs = [c for _, c in clusters(merged(target))]
        assert specs and all(c.get("spark_env_vars") == "${var.task_environment}" for c in specs), target
    # deploying staging with an override, as `databricks bundle deploy -t staging --var catalog=sandbox` resolves it
    monkeypatch.setenv("BUNDLE_VAR_catalog", "sandbox")
    deployed = load_jobs(get_environment("staging"))["model_build"].tasks["train"].cluster["spark_env_vars"]
    assert deployed["BUNDLE_VAR_catalog"] == "sandbox" and deployed["BUNDLE_VAR_model_name"] == "sandbox.credit.default_model"
    assert deployed["SERVING_MLOPS_BUNDLE_TARGET"] == "staging"
    assert all(isinstance(v, str) for v in deployed.values()) and deployed["BUNDLE_VAR_n_trials"] == "10"  # the Jobs API's text
    # the cluster: the synced bundle folder, the notebook's folder as working directory, the cluster's environment variables
    monkeypatch.delenv("BUNDLE_VAR_catalog")
    files = tmp_path / "files"
    shutil.copytree(ROOT / "databricks_jobs", files)
    monkeypatch.chdir(files / "notebooks")
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "18.0")
    for name, value in deployed.items(): monkeypatch.setenv(name, value)
    on_cluster = get_environment("staging")
    assert on_cluster.bundle_path == files / "databricks.yml"
    assert (on_cluster.catalog, on_cluster.var("model_name"), on_cluster.var("n_trials", int)) == ("sandbox", "sandbox.credit.default_model", 10)
    assert get_environment("prod").catalog == "prod"  # the values are staging's: another target read there keeps its own


def test_the_bundle_creates_the_schema_and_volume_the_jobs_use():
    "Issue 26 item 5: `bundle deploy` creates the schema and landing volume (resources/unity_catalog.yml) under the names the code reads, in every target (development mode would prefix the schema: the bundle skips that)."
    from serving_mlops.config import get_environment
    for target in TARGETS:
        config = merged(target)
        assert config["experimental"]["skip_name_prefix_for_schema"] is True
        (schema,) = config["resources"]["schemas"].values()
        (volume,) = config["resources"]["volumes"].values()
        assert (schema["catalog_name"], schema["name"]) == ("${var.catalog}", "${var.schema}")
        assert volume["schema_name"] == "${resources.schemas.credit.name}" and volume["volume_type"] == "MANAGED"  # after the schema
        env = get_environment(target)
        made = f"/Volumes/{env.catalog}/{env.schema}/{env.var('landing_volume')}"
        assert volume["catalog_name"] == "${var.catalog}" and volume["name"] == "${var.landing_volume}"
        assert made.startswith(f"/Volumes/{target}/credit/")  # what a workspace target's landing_dir names


def test_production_schedules_run_and_the_others_stay_paused():
    "Issue 26 item 8: prod's hourly monitoring and daily batch scoring run once deployed; staging's are paused by its preset and dev's by development mode (the CLI's ApplyPresets sets a schedule's pause_status only where the job leaves it empty)."
    for target, expected in (("dev", None), ("staging", "PAUSED"), ("prod", "UNPAUSED")):
        config = merged(target)
        scheduled = [j for j in config["resources"]["jobs"].values() if "schedule" in j]
        assert sorted(j["name"].split("-${")[0] for j in scheduled) == ["serving-mlops-batch-inference", "serving-mlops-monitoring"]
        assert all("pause_status" not in j["schedule"] for j in scheduled)  # the target's preset decides
        assert (config.get("presets") or {}).get("trigger_pause_status") == expected, target
    assert merged("dev")["targets"]["dev"]["mode"] == "development"  # which pauses every schedule


def test_every_job_emails_the_targets_list_when_a_run_fails(tmp_path, monkeypatch):
    "Issue 26 item 8: each job's email_notifications.on_failure is the complex variable failure_emails (none by default; a target sets its list)."
    from serving_mlops.config import get_environment
    from serving_mlops.jobs import substitute
    for target in TARGETS:
        jobs = merged(target)["resources"]["jobs"]
        assert jobs and all(j.get("email_notifications") == {"on_failure": "${var.failure_emails}"} for j in jobs.values()), target
    assert get_environment("prod").variables["failure_emails"] == []
    bundle = yaml.safe_load(BUNDLE.read_text())
    bundle["targets"]["prod"].setdefault("variables", {})["failure_emails"] = ["ops@example.com", "ml@example.com"]
    (tmp_path / "databricks.yml").write_text(yaml.safe_dump(bundle))
    prod = get_environment("prod", tmp_path / "databricks.yml")
    assert substitute({"on_failure": "${var.failure_emails}"}, prod, "job") == {"on_failure": ["ops@example.com", "ml@example.com"]}
    monkeypatch.setenv("BUNDLE_VAR_failure_emails", "ops@example.com")  # as the CLI: a complex variable takes no text value
    with pytest.raises(Exception, match="variable 'failure_emails' is of type complex"): get_environment("prod")
