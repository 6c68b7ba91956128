#!/usr/bin/python3
"""Check deploy/Containerfile and deploy/k8s/ against the tree they ship.

Run by tests/deploy/test_container.c (Debian's python3 with python3-yaml):

    check_deploy.py --root REPO --build BUILD_DIR [--k8s DIR] [--containerfile FILE]
                    [--unbuilt PROGRAM]...

Exit 0 when everything matches, 1 with one line per problem on stderr
("containerfile: ...", "k8s: ..."). It needs no network and no container
runtime: it reads the files, the Makefile fragments that say what we build,
and the ELF dependencies of the programs the build tree holds.
"""
import argparse
import glob
import os
import re
import shlex
import subprocess
import sys

import yaml

problems = []


def bad(where, msg):
    problems.append(f"{where}: {msg}")


# ---- what the tree builds and installs ------------------------------------

def built_programs(root, build):
    """Programs we build (an add_prog of some module.mk, or what the build tree's
    bin/ holds: some names are made up by make) and those deploy/install.sh
    installs to bin/."""
    made = set()
    bindir = os.path.join(build, "bin")
    if os.path.isdir(bindir):
        made.update(f for f in os.listdir(bindir) if os.access(os.path.join(bindir, f), os.X_OK))
    for mk in glob.glob(os.path.join(root, "**", "module.mk"), recursive=True):
        if "/build/" in mk:
            continue
        with open(mk) as f:
            made.update(re.findall(r"add_prog,([A-Za-z0-9_.-]+),", f.read()))
    with open(os.path.join(root, "deploy", "install.sh")) as f:
        m = re.search(r"^progs=\(([^)]*)\)", f.read(), re.M)
    installed = set(m.group(1).split()) if m else set()
    return made, installed


# ---- Containerfile ------------------------------------------------------------

def instructions(path):
    """[(lineno, KEYWORD, rest)] with continuation lines joined, comments dropped."""
    out, buf, start = [], "", 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            s = line.rstrip("\n")
            if not buf and (not s.strip() or s.lstrip().startswith("#")):
                continue
            if buf and s.lstrip().startswith("#"):
                continue
            if not buf:
                start = n
            if s.endswith("\\"):
                buf += s[:-1] + " "
                continue
            buf += s
            kw, _, rest = buf.strip().partition(" ")
            out.append((start, kw.upper(), rest.strip()))
            buf = ""
    if buf:
        bad("containerfile", f"line {start}: continuation at the end of the file")
    return out


def exec_form(rest):
    if rest.startswith("["):
        import json
        return json.loads(rest)
    return shlex.split(rest)


def check_containerfile(args, progs, uid_gid):
    made, installed = progs
    where = "containerfile"
    ins = instructions(args.containerfile)
    stages, cur = {}, None
    image_files = set()  # absolute paths that COPY puts into the final image
    runtime_pkgs = set()
    exposed = []
    cmds = []
    for n, kw, rest in ins:
        if kw == "FROM":
            toks = rest.split()
            base = toks[0]
            if not re.match(r"^(docker\.io/(library/)?)?debian:12(-slim)?$", base):
                bad(where, f"line {n}: base image {base} is not Debian 12")
            name = toks[2] if len(toks) >= 3 and toks[1].upper() == "AS" else None
            cur = {"name": name, "runs": [], "line": n}
            if name:
                stages[name] = cur
            image_files = set()
            runtime_pkgs = set()
            exposed, cmds = [], []
        elif kw == "RUN":
            cur["runs"].append(rest)
            for m in re.finditer(r"apt-get install ([^&;|]*)", rest):
                runtime_pkgs.update(t for t in m.group(1).split() if not t.startswith("-"))
        elif kw == "COPY":
            toks = shlex.split(rest)
            frm = None
            while toks and toks[0].startswith("--"):
                if toks[0].startswith("--from="):
                    frm = toks[0][len("--from="):]
                toks = toks[1:]
            if len(toks) < 2:
                bad(where, f"line {n}: COPY needs a source and a destination")
                continue
            *srcs, dst = toks
            for src in srcs:
                if frm is None:
                    if not os.path.exists(os.path.join(args.root, src)):
                        bad(where, f"line {n}: COPY source {src} is not in the repository")
                    if src != "." and not dst.endswith("/"):
                        image_files.add(dst)
                elif frm not in stages:
                    bad(where, f"line {n}: COPY --from={frm}: no such earlier stage")
                else:
                    runs = " ".join(stages[frm]["runs"])
                    m = re.search(r"make install PREFIX=(\S+) DESTDIR=(\S+)", runs)
                    if not m:
                        bad(where, f"line {n}: stage {frm} never runs make install "
                                   "PREFIX=... DESTDIR=...")
                        continue
                    prefix, destdir = m.group(1), m.group(2)
                    sysconf = "/etc" if prefix == "/usr" else prefix + "/etc"
                    ok = (src.rstrip("/") + "/").startswith(destdir + prefix + "/") or \
                        (src.rstrip("/") + "/").startswith(destdir + sysconf + "/gorgon/")
                    if not ok:
                        bad(where, f"line {n}: {src} is not something make install puts "
                                   f"under {destdir}")
                    if src.rstrip("/") == destdir + prefix and dst.rstrip("/") == prefix:
                        for p in installed & made:
                            image_files.add(f"{prefix}/bin/{p}")
        elif kw == "EXPOSE":
            exposed += [int(p.split("/")[0]) for p in rest.split()]
        elif kw in ("CMD", "ENTRYPOINT"):
            cmds.append((n, exec_form(rest)))
        elif kw == "USER":
            uid_gid["user"] = rest
    m = None
    for n, kw, rest in ins:
        if kw == "RUN":
            u = re.search(r"useradd [^&]*--uid (\d+)", rest)
            g = re.search(r"groupadd [^&]*--gid (\d+)", rest)
            if u:
                uid_gid["uid"] = int(u.group(1))
            if g:
                uid_gid["gid"] = int(g.group(1))
    if "uid" not in uid_gid or "gid" not in uid_gid:
        bad(where, "the gorgon user has no fixed --uid/--gid (the k8s manifests name them)")
    for n, argv in cmds:
        if argv and argv[0] not in image_files:
            bad(where, f"line {n}: {argv[0]} is not a file the image gets")
    uid_gid["exposed"] = exposed
    uid_gid["image_files"] = image_files

    # The programs the container-run script starts are ones we build.
    script = os.path.join(args.root, "deploy", "container-run.sh")
    if os.path.exists(script):
        with open(script) as f:
            for p in set(re.findall(r'"\$bin/([A-Za-z0-9_-]+)"', f.read())):
                if p not in made and p not in args.unbuilt:
                    bad(where, f"deploy/container-run.sh starts {p}, which no module.mk builds")

    # Every library our installed programs link is installed in the run stage.
    need = set()
    for p in sorted(installed & made) + ["gorgon-worker"]:
        exe = os.path.join(args.build, "bin", p)
        if not os.path.exists(exe):
            continue
        out = subprocess.run(["readelf", "-d", exe], capture_output=True, text=True).stdout
        need.update(re.findall(r"Shared library: \[([^\]]+)\]", out))
    # A SAN= build tree links the sanitizer runtimes; the image's build
    # (plain `make all`) does not.
    need = {so for so in need if not re.match(r"lib(asan|ubsan|tsan|lsan)\.so", so)}
    ldcache = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
    paths = {}
    for so in sorted(need):
        m = re.search(r"^\s*" + re.escape(so) + r" \(libc6,x86-64\) => (\S+)$", ldcache, re.M)
        if not m:
            bad(where, f"cannot find {so} in the ldconfig cache")
            continue
        p = m.group(1)
        # merged /usr: dpkg knows each file under one of its two names
        paths[so] = {c for q in (p, os.path.realpath(p))
                     for c in (q, q.removeprefix("/usr"), "/usr" + q)}
    owner = {}
    every = sorted(set().union(*paths.values())) if paths else []
    if every:
        r = subprocess.run(["dpkg", "-S"] + every, capture_output=True, text=True)
        for line in r.stdout.splitlines():
            pkg, _, path = line.partition(": ")
            owner[path.strip()] = pkg.split(":")[0]
    for so, cands in sorted(paths.items()):
        pkgs = {owner[c] for c in cands if c in owner}
        if not pkgs:
            bad(where, f"{so} belongs to no Debian package")
            continue
        pkg = sorted(pkgs)[0]
        if pkg not in runtime_pkgs and pkg != "libc6":
            bad(where, f"our programs link {so} from {pkg}, which the run stage does not "
                       f"install (it installs: {' '.join(sorted(runtime_pkgs))})")


# ---- Kubernetes -------------------------------------------------------------------

def load_all(path):
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        bad("k8s", f"{path}: not YAML: {e}")
        return []


def port_of(container, ref):
    if isinstance(ref, int):
        return ref
    for p in container.get("ports", []):
        if p.get("name") == ref:
            return p.get("containerPort")
    return None


def arg_after(args_, flag):
    if flag in args_:
        i = args_.index(flag)
        if i + 1 < len(args_):
            return args_[i + 1]
    return None


def check_container_cmd(where, argv, progs, files, unbuilt):
    made, installed = progs
    if not argv:
        bad(where, "no command (the image's default runs both programs; say which)")
        return
    exe = argv[0]
    if exe in ("/bin/sh", "/bin/bash"):
        script = " ".join(argv[1:])
        for p in re.findall(r"/usr/bin/([A-Za-z0-9_-]+)", script):
            if p not in made and p not in unbuilt:
                bad(where, f"the script runs /usr/bin/{p}, which no module.mk builds")
        return
    m = re.match(r"^/usr/bin/([A-Za-z0-9_-]+)$", exe)
    if not m:
        bad(where, f"command {exe} is not one of our programs in /usr/bin")
        return
    name = m.group(1)
    if name in unbuilt:
        return
    if name not in made:
        bad(where, f"{exe}: no module.mk builds {name}")
    elif name not in installed:
        bad(where, f"{exe}: deploy/install.sh does not install {name}")


def check_pod(where, dep, progs, ids, image, unbuilt, sidecar_port):
    spec = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    sel = dep["spec"].get("selector", {}).get("matchLabels", {})
    if not sel or any(labels.get(k) != v for k, v in sel.items()):
        bad(where, f"selector {sel} does not match the pod labels {labels}")
    sc = spec.get("securityContext", {})
    if ids.get("uid") is not None and sc.get("runAsUser") != ids["uid"]:
        bad(where, f"runAsUser {sc.get('runAsUser')} is not the image's gorgon uid {ids['uid']}")
    if ids.get("gid") is not None and sc.get("runAsGroup") != ids["gid"]:
        bad(where, f"runAsGroup {sc.get('runAsGroup')} is not the image's gorgon gid "
                   f"{ids['gid']}")
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    cons = {c["name"]: c for c in spec.get("containers", [])}
    every = spec.get("containers", []) + spec.get("initContainers", [])
    for name in ("gorgond", "sidecar"):
        if name not in cons:
            bad(where, f"no container named {name}")
    for c in every:
        cw = f"{where}: container {c['name']}"
        if c.get("image") != image:
            bad(cw, f"image {c.get('image')} is not {image}, the image the docs build")
        for vm in c.get("volumeMounts", []):
            if vm["name"] not in vols:
                bad(cw, f"mounts volume {vm['name']}, which the pod does not define")
        check_container_cmd(cw, list(c.get("command", [])) + list(c.get("args", [])), progs,
                            ids.get("image_files", set()), unbuilt)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            ex = c.get(probe, {}).get("exec")
            if ex:
                check_container_cmd(f"{cw} {probe}", ex.get("command", []), progs, set(),
                                    unbuilt)
    for v in vols.values():
        if "persistentVolumeClaim" in v:
            ids.setdefault("claims", set()).add(v["persistentVolumeClaim"]["claimName"])

    def mount(c, path):
        for vm in c.get("volumeMounts", []):
            if vm["mountPath"] == path:
                return vols.get(vm["name"])
        return None

    if "gorgond" not in cons or "sidecar" not in cons:
        return
    gd, sc_ = cons["gorgond"], cons["sidecar"]
    for path, memory in (("/run/gorgon", False), ("/dev/shm", True)):
        a, b = mount(gd, path), mount(sc_, path)
        if a is None or b is None or a is not b:
            bad(where, f"gorgond and the sidecar must share one volume at {path}")
        elif "emptyDir" not in a:
            bad(where, f"{path} must be an emptyDir")
        elif memory and (a["emptyDir"] or {}).get("medium") != "Memory":
            bad(where, f"{path} must be an emptyDir with medium: Memory")
    gargs, sargs = gd.get("args", []), sc_.get("args", [])
    gsock, ssock = arg_after(gargs, "--socket"), arg_after(sargs, "--socket")
    if not gsock or gsock != ssock:
        bad(where, f"gorgond's --socket {gsock} and the sidecar's {ssock} differ")
    elif os.path.dirname(gsock) != "/run/gorgon":
        bad(where, f"the socket {gsock} is not in the shared /run/gorgon")
    cfg = arg_after(gargs, "--config")
    if cfg and cfg != "/etc/gorgon/gorgond.ini":
        bad(where, f"--config {cfg}: the image has /etc/gorgon/gorgond.ini")
    model = arg_after(gargs, "--model")
    if model:
        mdir = os.path.dirname(model)
        if mount(gd, mdir) is None:
            bad(where, f"--model {model}: nothing is mounted at {mdir}")
    listen = arg_after(sargs, "--listen")
    lport = int(listen.rsplit(":", 1)[1]) if listen and ":" in listen else sidecar_port
    ports = [p.get("containerPort") for p in sc_.get("ports", [])]
    if lport not in ports:
        bad(where, f"the sidecar listens on {lport} but declares ports {ports}")
    if lport not in ids.get("exposed", []):
        bad(where, f"the sidecar listens on {lport} but the Containerfile exposes "
                   f"{ids.get('exposed')}")
    rp = sc_.get("readinessProbe", {}).get("httpGet")
    if not rp or rp.get("path") != "/health" or port_of(sc_, rp.get("port")) != lport:
        bad(where, f"the sidecar's readinessProbe must be GET /health on {lport}: {rp}")
    ids["pod_labels"] = labels
    ids["sidecar_container"] = sc_
    ids["sidecar_port"] = lport


def check_k8s(args, progs, ids):
    where = "k8s"
    docs = {}
    base_files = sorted(glob.glob(os.path.join(args.k8s, "*.yaml")))
    if not base_files:
        bad(where, f"no manifests in {args.k8s}")
        return
    for path in sorted(glob.glob(os.path.join(args.k8s, "**", "*.yaml"), recursive=True)):
        docs[path] = load_all(path)
        for d in docs[path]:
            for k in ("apiVersion", "kind"):
                if k not in d:
                    bad(where, f"{path}: a document without {k}")
    with open(os.path.join(args.root, "docs", "deploy.md")) as f:
        doc_text = f.read()
    m = re.search(r"podman build -f deploy/Containerfile -t (\S+)", doc_text)
    if not m:
        bad(where, "docs/deploy.md does not say how the image is built (podman build -t)")
        return
    image = m.group(1)
    base = [d for p in base_files for d in docs[p]]
    deps = [d for d in base if d.get("kind") == "Deployment"]
    if len(deps) != 1:
        bad(where, f"want one Deployment, found {len(deps)}")
        return
    dep = deps[0]
    check_pod(f"{where}: Deployment {dep['metadata']['name']}", dep, progs, ids, image,
              args.unbuilt, 8080)
    claims = {d["metadata"]["name"] for d in base if d.get("kind") == "PersistentVolumeClaim"}
    for c in ids.get("claims", set()):
        if c not in claims:
            bad(where, f"the pod claims volume {c}, which no manifest defines")
    svcs = [d for d in base if d.get("kind") == "Service"]
    if not svcs:
        bad(where, "no Service")
    for s in svcs:
        sw = f"{where}: Service {s['metadata']['name']}"
        sel = s["spec"].get("selector", {})
        labels = ids.get("pod_labels", {})
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            bad(sw, f"selector {sel} selects no pod of the Deployment")
        for p in s["spec"].get("ports", []):
            if port_of(ids.get("sidecar_container", {}), p.get("targetPort")) != \
                    ids.get("sidecar_port"):
                bad(sw, f"targetPort {p.get('targetPort')} is not the sidecar's port")

    # Overlays: every kustomization's resources and patches exist, and the
    # GPU one asks for nvidia.com/gpu: 1 for a container of the Deployment.
    kusts = [p for p in docs if os.path.basename(p) == "kustomization.yaml"]
    if not kusts:
        bad(where, "no GPU overlay (a kustomization.yaml under deploy/k8s/)")
    gpu = False
    cons = {c["name"] for c in dep["spec"]["template"]["spec"]["containers"]}
    for k in kusts:
        kd = docs[k][0] if docs[k] else {}
        kdir = os.path.dirname(k)
        for r in kd.get("resources", []):
            if not os.path.exists(os.path.normpath(os.path.join(kdir, r))):
                bad(where, f"{k}: resource {r} does not exist")
        for pt in kd.get("patches", []) + [{"path": p} for p in kd.get("patchesStrategicMerge", [])]:
            pp = os.path.normpath(os.path.join(kdir, pt["path"]))
            if not os.path.exists(pp):
                bad(where, f"{k}: patch {pt['path']} does not exist")
                continue
            tgt = pt.get("target", {})
            if tgt and (tgt.get("kind") != "Deployment" or
                        tgt.get("name") != dep["metadata"]["name"]):
                bad(where, f"{k}: patch target {tgt} is not the Deployment")
            for d in load_all(pp):
                if d.get("kind") != "Deployment" or d["metadata"]["name"] != dep["metadata"]["name"]:
                    bad(where, f"{pp}: patches {d.get('kind')} {d.get('metadata')}, not the "
                               "Deployment")
                    continue
                for c in d["spec"]["template"]["spec"].get("containers", []):
                    if c["name"] not in cons:
                        bad(where, f"{pp}: patches container {c['name']}, which the "
                                   "Deployment does not have")
                    res = c.get("resources", {})
                    if res.get("requests", {}).get("nvidia.com/gpu") == 1 and \
                            res.get("limits", {}).get("nvidia.com/gpu") == 1:
                        gpu = True
    if kusts and not gpu:
        bad(where, "no overlay requests nvidia.com/gpu: 1 (requests and limits)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--build", required=True)
    ap.add_argument("--k8s")
    ap.add_argument("--containerfile")
    ap.add_argument("--unbuilt", action="append", default=[],
                    help="a program the files may name that this tree does not build yet")
    args = ap.parse_args()
    args.k8s = args.k8s or os.path.join(args.root, "deploy", "k8s")
    args.containerfile = args.containerfile or os.path.join(args.root, "deploy", "Containerfile")
    progs = built_programs(args.root, args.build)
    ids = {}
    check_containerfile(args, progs, ids)
    check_k8s(args, progs, ids)
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"deploy files ok: image programs {sorted(progs[0] & progs[1])}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
