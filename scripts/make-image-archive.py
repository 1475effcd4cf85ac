"""Write a docker-archive tarball (what `docker save` writes and `ctr images import` reads) from
files on the host, with no daemon and no registry: the test cluster's pause and busybox images.

    python3 make-image-archive.py OUT.tar NAME:TAG [--entrypoint JSON] [--cmd JSON]
                                  [--busybox-applets /bin/busybox] SRC=DST ...

One layer, owned by root, mtime 0; a minimal /etc/passwd and /etc/group so user ids resolve."""
import argparse
import hashlib
import io
import json
import os
import subprocess
import tarfile

BASE_DIRS = (("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o755), ("sys", 0o755),
             ("tmp", 0o1777), ("root", 0o700), ("home", 0o755))
PASSWD = b"root:x:0:0:root:/root:/bin/sh\ncdsw:x:8536:8536:cdsw:/home/cdsw:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
GROUP = b"root:x:0:\ncdsw:x:8536:\nnogroup:x:65534:\n"


def layer_bytes(entries: list[tuple[str, str]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = set()

        def add_dir(path: str, mode: int = 0o755) -> None:
            if not path or path in made:
                return
            add_dir(os.path.dirname(path))
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
            made.add(path)

        for path, mode in BASE_DIRS:
            add_dir(path, mode)
        for dest, source in entries:
            dest = dest.strip("/")
            add_dir(os.path.dirname(dest))
            info = tarfile.TarInfo(dest)
            if source.startswith("@"):
                info.type, info.linkname = tarfile.SYMTYPE, source[1:]
                tar.addfile(info)
            else:
                with open(source, "rb") as f:
                    data = f.read()
                info.size, info.mode = len(data), os.stat(source).st_mode & 0o7777
                tar.addfile(info, io.BytesIO(data))
        for name, data in (("etc/passwd", PASSWD), ("etc/group", GROUP)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_archive(out: str, tag: str, entries, entrypoint=None, cmd=None) -> None:
    layer = layer_bytes(entries)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
              "config": {"Entrypoint": entrypoint, "Cmd": cmd, "WorkingDir": "/",
                         "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]},
              "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "make-image-archive.py"}]}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_id = hashlib.sha256(config_bytes).hexdigest()
    manifest = json.dumps([{"Config": config_id + ".json", "RepoTags": [tag],
                            "Layers": [diff_id[7:] + "/layer.tar"]}]).encode()
    with tarfile.open(out + ".part", "w") as tar:
        for name, data in ((config_id + ".json", config_bytes), (diff_id[7:] + "/layer.tar", layer),
                           ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(out + ".part", out)
    print(f"{out}: {tag} ({len(layer)} byte layer)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("tag")
    parser.add_argument("--entrypoint", type=json.loads)
    parser.add_argument("--cmd", type=json.loads)
    parser.add_argument("--busybox-applets", help="a static busybox: /bin/busybox plus a link per applet")
    parser.add_argument("files", nargs="*", help="SRC=DST, or @LINKTARGET=DST for a symlink")
    args = parser.parse_intermixed_args()   # a greedy --entrypoint must not swallow the file list
    entries = [(dest, source) for source, dest in (f.split("=", 1) for f in args.files)]
    if args.busybox_applets:
        entries.append(("/bin/busybox", args.busybox_applets))
        applets = subprocess.run([args.busybox_applets, "--list-full"], capture_output=True, text=True,
                                 check=True).stdout.split()
        entries += [("/" + applet, "@/bin/busybox") for applet in applets if applet != "bin/busybox"]
    write_archive(args.out, args.tag, entries, args.entrypoint, args.cmd)


if __name__ == "__main__":
    main()
