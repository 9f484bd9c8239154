"""Assertions on the manifests `helm template` rendered from helm/mailgate (deploy-checks.sh).

usage: check_rendered.py RENDERED.yaml VALUES.yaml

Checks what a reviewer of the chart would check by hand: probes on every container, no secret
value outside a Secret, secretKeyRef for every secret setting, API-key authentication on every
mailgate server (MAILGATE_AUTH__MODE=keys, the keys file mounted from the Secret), the
restrictive security context, a termination grace longer than mailgate's shutdown grace, the
migration Job's hook annotations, and the shape each value set asks for (split roles,
existing Secret, NetworkPolicy, autoscaling).
"""

import base64
import posixpath
import re
import sys

import yaml

SECRET_ENV = {
    "MAILGATE_DATABASE_URL",
    "MAILGATE_ENCRYPTION__KEY",
    "MAILGATE_ENCRYPTION__PREVIOUS_KEYS",
    "MAILGATE_SYSTEM_DEFAULT__SMTP_URL",
}
UNITS = {"s": 1, "m": 60, "h": 3600}
HASH = re.compile(r"sha256:[0-9a-fA-F]{64}")

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


def seconds(duration):
    m = re.fullmatch(r"\s*(\d+)\s*([smh])\s*", duration)
    return int(m.group(1)) * UNITS[m.group(2)] if m else None


def main(rendered_path, values_path):
    docs = [d for d in yaml.safe_load_all(open(rendered_path)) if d]
    values = yaml.safe_load(open(values_path)) or {}
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    secrets_values = values.get("secrets") or {}
    existing = secrets_values.get("existingSecret") or ""
    split = ((values.get("roles") or {}).get("split")) is True
    autoscaling = ((values.get("autoscaling") or {}).get("enabled")) is True
    netpol = ((values.get("networkPolicy") or {}).get("enabled")) is True

    # --- secret values appear only inside Secrets (base64), never in clear anywhere ----------
    raw = open(rendered_path).read()
    secret_strings = [
        secrets_values.get(k)
        for k in ("databaseUrl", "encryptionKey", "previousEncryptionKeys", "systemDefaultSmtpUrl", "apiKeys")
        if secrets_values.get(k)
    ]
    non_secret_text = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for s in secret_strings:
        check(s not in raw, f"a secret value appears in clear in the rendered output: {s[:12]}...")
        b64 = base64.b64encode(s.encode()).decode()
        check(b64 not in non_secret_text, "a base64 secret value appears outside a Secret")

    # --- ConfigMap: only non-secret settings ----------------------------------------------
    configmaps = by_kind.get("ConfigMap", [])
    check(len(configmaps) == 1, f"want 1 ConfigMap, got {len(configmaps)}")
    config = configmaps[0]["data"] if configmaps else {}
    for name in SECRET_ENV:
        check(name not in config, f"ConfigMap carries the secret setting {name}")
    grace = seconds(config.get("MAILGATE_SHUTDOWN_GRACE", ""))
    check(grace is not None, "ConfigMap has no MAILGATE_SHUTDOWN_GRACE in seconds/minutes/hours")
    # The pool size is passed only when set: unset, mailgate picks it by backend.
    pool = (values.get("config") or {}).get("databaseMaxConnections")
    got = config.get("MAILGATE_DATABASE_MAX_CONNECTIONS")
    check(got == (None if pool is None else str(pool)),
          f"MAILGATE_DATABASE_MAX_CONNECTIONS is {got!r} for databaseMaxConnections {pool!r}")
    # Likewise the worker threads: unset, one per CPU the pod may use.
    workers = (values.get("config") or {}).get("workerThreads")
    got = config.get("MAILGATE_WORKER_THREADS")
    check(got == (None if workers is None else str(workers)),
          f"MAILGATE_WORKER_THREADS is {got!r} for workerThreads {workers!r}")

    # --- Secrets ---------------------------------------------------------------------------
    secret_objs = by_kind.get("Secret", [])
    if existing:
        check(not secret_objs, f"existingSecret is set but the chart renders Secrets: "
                               f"{[s['metadata']['name'] for s in secret_objs]}")

    # --- API keys: where the file comes from and where it is mounted ------------------------
    api_keys_key = ((secrets_values.get("keys") or {}).get("apiKeys")) or "api-keys"
    mount_dir = ((values.get("apiKeys") or {}).get("mountPath")) or "/etc/mailgate/secrets"
    keys_file = posixpath.normpath(f"{mount_dir}/{api_keys_key}")
    release_secrets = [s for s in secret_objs if "helm.sh/hook" not in s["metadata"].get("annotations", {})]
    if existing:
        keys_secret = existing
    else:
        check(len(release_secrets) == 1, f"want 1 chart-created Secret, got {len(release_secrets)}")
        keys_secret = release_secrets[0]["metadata"]["name"] if release_secrets else None
        for sec in release_secrets:
            content = base64.b64decode((sec.get("data") or {}).get(api_keys_key, "")).decode()
            check(content == secrets_values.get("apiKeys"),
                  f"Secret {sec['metadata']['name']}: {api_keys_key} is not secrets.apiKeys")
            check("[[keys]]" in content and HASH.search(content),
                  f"Secret {sec['metadata']['name']}: {api_keys_key} holds no [[keys]] entry with a sha256 hash")

    # --- Deployments -----------------------------------------------------------------------
    deployments = by_kind.get("Deployment", [])
    components = sorted(d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                        for d in deployments)
    check(components == (["api", "worker"] if split else ["server"]),
          f"Deployments by component: {components}")
    for d in deployments:
        name = d["metadata"]["name"]
        component = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = d["spec"]["template"]["spec"]
        if autoscaling:
            check("replicas" not in d["spec"], f"{name}: replicas set although an HPA scales it")
        elif not split:
            check(d["spec"].get("replicas") == values.get("replicaCount", 2),
                  f"{name}: replicas {d['spec'].get('replicas')}")
        tgps = pod.get("terminationGracePeriodSeconds")
        check(isinstance(tgps, int), f"{name}: no terminationGracePeriodSeconds")
        if isinstance(tgps, int) and grace is not None:
            check(tgps > grace, f"{name}: terminationGracePeriodSeconds {tgps} <= shutdown grace {grace}")
        check_pod_security(name, pod)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            cname = f"{name}/{c['name']}"
            port = next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == "grpc"), None)
            check(port is not None, f"{cname}: no grpc port")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                p = c.get(probe)
                check(p is not None, f"{cname}: no {probe}")
                if p:
                    check((p.get("grpc") or {}).get("port") == port,
                          f"{cname}: {probe} is not a native gRPC probe on the grpc port")
            check_container_security(cname, c)
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            for path in ("/data", "/tmp"):
                vol = volumes.get(mounts.get(path, ""), {})
                check("emptyDir" in vol, f"{cname}: {path} is not an emptyDir")
            env = {e["name"]: e for e in c.get("env", [])}
            for e in c.get("env", []):
                if e["name"] in SECRET_ENV:
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    check(ref is not None and "value" not in e,
                          f"{cname}: {e['name']} is not read through secretKeyRef")
                    if ref and existing:
                        check(ref["name"] == existing, f"{cname}: {e['name']} reads {ref['name']}")
                if re.search(r"(PASSWORD|SECRET|TOKEN|_KEYS?$|_URL$)", e["name"]) and "value" in e:
                    check(False, f"{cname}: {e['name']} has an inline value")
            for required in ("MAILGATE_DATABASE_URL", "MAILGATE_ENCRYPTION__KEY"):
                check(required in env, f"{cname}: no {required}")
            delivery = env.get("MAILGATE_DELIVERY__ENABLED", {}).get("value")
            if component == "api":
                check(delivery == "false", f"{cname}: the api role must set MAILGATE_DELIVERY__ENABLED=false")
            else:
                check(delivery is None, f"{cname}: the {component} role must deliver")
            check(any(ef.get("configMapRef") for ef in c.get("envFrom", [])),
                  f"{cname}: settings ConfigMap not referenced")
            check_api_keys(cname, c, volumes, keys_secret, api_keys_key, mount_dir, keys_file)

    # --- Service ---------------------------------------------------------------------------
    services = by_kind.get("Service", [])
    check(len(services) == 1, f"want 1 Service, got {len(services)}")
    for s in services:
        grpc = [p for p in s["spec"]["ports"] if p["name"] == "grpc"]
        check(grpc and grpc[0]["port"] == 50051 and grpc[0].get("appProtocol") == "grpc",
              "Service: no grpc port 50051 with appProtocol grpc")
        want = "api" if split else "server"
        check(s["spec"]["selector"].get("app.kubernetes.io/component") == want,
              f"Service does not select the {want} pods")

    # --- rekey Job (optional): after install/upgrade, secrets through secretKeyRef ----------
    all_jobs = by_kind.get("Job", [])
    rekey_jobs = [j for j in all_jobs
                  if j["spec"]["template"]["spec"]["containers"][0].get("args") == ["rekey"]]
    want_rekey = ((values.get("rekey") or {}).get("enabled")) is True
    check(len(rekey_jobs) == (1 if want_rekey else 0), f"rekey Jobs: {len(rekey_jobs)}")
    for j in rekey_jobs:
        hooks = set(j["metadata"].get("annotations", {}).get("helm.sh/hook", "").split(","))
        check({"post-install", "post-upgrade"} <= hooks, f"rekey Job hooks {hooks}")
        pod = j["spec"]["template"]["spec"]
        check_pod_security(j["metadata"]["name"], pod)
        for c in pod["containers"]:
            check_container_security(f"rekey/{c['name']}", c)
            names = {e["name"] for e in c.get("env", [])}
            check({"MAILGATE_ENCRYPTION__KEY", "MAILGATE_ENCRYPTION__PREVIOUS_KEYS"} <= names,
                  "rekey Job lacks the current or previous keys")
            for e in c.get("env", []):
                if e["name"] in SECRET_ENV:
                    check("value" not in e and (e.get("valueFrom") or {}).get("secretKeyRef"),
                          f"rekey Job: {e['name']} is not read through secretKeyRef")

    # --- migration Job ---------------------------------------------------------------------
    jobs = [j for j in all_jobs if j not in rekey_jobs]
    check(len(jobs) == 1, f"want 1 migration Job, got {len(jobs)}")
    for j in jobs:
        ann = j["metadata"].get("annotations", {})
        hooks = set(ann.get("helm.sh/hook", "").split(","))
        check({"pre-install", "pre-upgrade"} <= hooks, f"Job hook annotation is {ann.get('helm.sh/hook')!r}")
        check("before-hook-creation" in ann.get("helm.sh/hook-delete-policy", ""),
              "Job has no before-hook-creation delete policy")
        pod = j["spec"]["template"]["spec"]
        check(pod.get("restartPolicy") == "Never", "Job restartPolicy is not Never")
        check_pod_security(j["metadata"]["name"], pod)
        for c in pod["containers"]:
            check(c.get("args") == ["migrate"], f"Job container args {c.get('args')}")
            check_container_security(f"Job/{c['name']}", c)
            for e in c.get("env", []):
                if e["name"] in SECRET_ENV:
                    check("value" not in e and (e.get("valueFrom") or {}).get("secretKeyRef"),
                          f"Job: {e['name']} is not read through secretKeyRef")
        # Everything the hook needs at pre-install must itself be a hook (or pre-exist).
        sa = pod.get("serviceAccountName")
        hook_names = {(d["kind"], d["metadata"]["name"]) for d in docs
                      if "helm.sh/hook" in d["metadata"].get("annotations", {})}
        check(("ServiceAccount", sa) in hook_names, f"Job ServiceAccount {sa} is not created by a hook")
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not existing:
                    check(("Secret", ref["name"]) in hook_names,
                          f"Job reads Secret {ref['name']}, which does not exist at pre-install")
            check(not c.get("envFrom"), "Job uses envFrom (the ConfigMap does not exist at pre-install)")

    # --- PDB, HPA, ServiceAccount, NetworkPolicy -------------------------------------------
    check(len(by_kind.get("PodDisruptionBudget", [])) == len(deployments), "one PDB per Deployment")
    check(len(by_kind.get("HorizontalPodAutoscaler", [])) == (len(deployments) if autoscaling else 0),
          "one HPA per Deployment when autoscaling is enabled, none otherwise")
    check(len(by_kind.get("ServiceAccount", [])) >= 1, "no ServiceAccount")
    nps = by_kind.get("NetworkPolicy", [])
    check(len(nps) == (1 if netpol else 0), f"NetworkPolicies: {len(nps)}")
    for np in nps:
        ingress_ports = {p["port"] for rule in np["spec"]["ingress"] for p in rule.get("ports", [])}
        check(ingress_ports == {50051}, f"NetworkPolicy ingress ports {ingress_ports}")
        egress_ports = {p["port"] for rule in np["spec"]["egress"] for p in rule.get("ports", [])}
        check({53, 25, 465, 587, 2525, 5432} <= egress_ports, f"NetworkPolicy egress ports {egress_ports}")
        check(all(rule.get("ports") for rule in np["spec"]["egress"]),
              "NetworkPolicy has an egress rule without ports (allows everything)")

    if failures:
        for f in failures:
            print(f"FAIL {rendered_path}: {f}")
        return 1
    print(f"ok   {rendered_path}: {len(docs)} objects, "
          f"{', '.join(f'{k}={len(v)}' for k, v in sorted(by_kind.items()))}")
    return 0


def check_api_keys(cname, c, volumes, keys_secret, api_keys_key, mount_dir, keys_file):
    """Authentication is on: auth.mode=keys, and the keys file mounted where KEYS_FILE points."""
    env = {e["name"]: e for e in c.get("env", [])}
    names = [e["name"] for e in c.get("env", [])]
    for name in ("MAILGATE_AUTH__MODE", "MAILGATE_AUTH__KEYS_FILE"):
        check(names.count(name) == 1, f"{cname}: {name} set {names.count(name)} times")
    check(env.get("MAILGATE_AUTH__MODE", {}).get("value") == "keys",
          f"{cname}: MAILGATE_AUTH__MODE is not keys")
    check(env.get("MAILGATE_AUTH__KEYS_FILE", {}).get("value") == keys_file,
          f"{cname}: MAILGATE_AUTH__KEYS_FILE is not {keys_file}")
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == posixpath.normpath(mount_dir)]
    check(len(mounts) == 1 and mounts[0].get("readOnly") is True,
          f"{cname}: no read-only mount at {mount_dir}")
    vol = volumes.get(mounts[0]["name"], {}) if mounts else {}
    secret = vol.get("secret") or {}
    check(secret.get("secretName") == keys_secret,
          f"{cname}: the API keys volume reads Secret {secret.get('secretName')}, not {keys_secret}")
    check(not secret.get("optional"), f"{cname}: the API keys volume is optional")
    check(secret.get("items") == [{"key": api_keys_key, "path": api_keys_key}],
          f"{cname}: the API keys volume does not project {api_keys_key} as {api_keys_key}")


def check_pod_security(name, pod):
    sc = pod.get("securityContext") or {}
    check(sc.get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot is not true")
    check(sc.get("runAsUser") == 65532, f"{name}: pod runAsUser is not 65532")
    check((sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
          f"{name}: pod seccompProfile is not RuntimeDefault")
    check(pod.get("automountServiceAccountToken") is False, f"{name}: service account token mounted")


def check_container_security(name, c):
    sc = c.get("securityContext") or {}
    check(sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem is not true")
    check(sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation is not false")
    check(sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot is not true")
    check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{name}: capabilities not dropped")
    check(not ((sc.get("capabilities") or {}).get("add")), f"{name}: capabilities added")
    check(sc.get("privileged") in (None, False), f"{name}: privileged")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
