# SPDX-License-Identifier: GPL-2.0-or-later
"""Jobs: the jobs file (hostile and wrong files give one line naming the
line), which qubes a job selects and why, every warning and error of
`qbackup check`, job locks, and the qubes.BackupRequest service."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from qbackup import jobs, request
from qbackup.commands.jobs import job_lock, job_running
from qbackup.errors import QbackupError
from qbackup.qubes import QubeInfo, VolumeInfo

GOOD = textwrap.dedent("""\
    # qbackup jobs
    [jobs.daily]
    backup_vm = "sys-backup"
    include = ["work", "@tag:backup", "@type:TemplateVM"]
    exclude = ["@tag:nobackup"]
    passphrase_file = "/etc/qbackup/daily.pass"

    [jobs.all-weekly]
    backup_vm = "sys-backup"
    repo = "weekly.archive"
    include = ["@all"]
    exclude = ["untrusted"]
    live = true
    """)


def test_a_good_file():
    parsed = jobs.parse_jobs(GOOD, "jobs.toml")
    assert parsed == {
        "daily": jobs.Job(name="daily", backup_vm="sys-backup", repo="daily",
                          include=("work", "@tag:backup", "@type:TemplateVM"),
                          exclude=("@tag:nobackup",),
                          passphrase_file="/etc/qbackup/daily.pass"),
        "all-weekly": jobs.Job(name="all-weekly", backup_vm="sys-backup",
                               repo="weekly.archive", include=("@all",),
                               exclude=("untrusted",), live=True)}


@pytest.mark.parametrize("text, message", [
    ('[jobs.daily\nbackup_vm = "b"\n', r"jobs.toml: .*line 1"),
    ('[jobs.daily]\nbackup_vm = "b"\nbackup_vm = "c"\n', r"jobs.toml: .*line 3"),
    ('[jobs.d]\nbackup_vm = "b"\ninclude = ["x"]\n\n[job.e]\n', r"jobs.toml:5: unknown table or key 'job'"),
    ('backup_vm = "b"\n', r"jobs.toml:1: unknown table or key 'backup_vm'"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = ["x"]\nexlude = ["y"]\n',
     r"jobs.toml:4: job 'daily': unknown key 'exlude' \(known: backup_vm, exclude"),
    ('[jobs.daily]\nbackup_vm = 7\n', r"jobs.toml:2: job 'daily': backup_vm must be a string"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = "work"\n',
     r"jobs.toml:3: job 'daily': include must be a list"),
    ('[jobs.daily]\ninclude = ["work"]\n', r"jobs.toml:1: job 'daily' has no backup_vm"),
    ('[jobs.daily]\nbackup_vm = "bad name"\ninclude = ["w"]\n',
     r"jobs.toml:2: job 'daily': invalid backup qube name"),
    ('[jobs.daily]\nbackup_vm = "dom0"\ninclude = ["w"]\n',
     r"jobs.toml:2: job 'daily': invalid backup qube name 'dom0'"),
    ('[jobs.daily]\nbackup_vm = "b"\nrepo = "../etc"\ninclude = ["w"]\n',
     r"jobs.toml:3: job 'daily': invalid repository name"),
    ('[jobs.daily]\nbackup_vm = "b"\n', r"jobs.toml:1: job 'daily' includes nothing"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = []\n', r"jobs.toml:3: job 'daily' includes nothing"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = ["@tag:a b"]\n',
     r"jobs.toml:3: job 'daily': invalid include entry '@tag:a b'"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = ["@type:Frob"]\n', r"invalid include entry"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = ["@anyvm"]\n', r"invalid include entry"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = [7]\n', r"invalid include entry 7"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = ["w"]\nexclude = ["-x"]\n',
     r"jobs.toml:4: job 'daily': invalid exclude entry '-x'"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = ["w"]\nexclude = ["@all"]\n',
     r"jobs.toml:4: .*\"@all\" cannot be excluded"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = ["w"]\npassphrase_file = "pw"\n',
     r"jobs.toml:4: job 'daily': passphrase_file must be an absolute path"),
    ('[jobs.Daily]\nbackup_vm = "b"\ninclude = ["w"]\n', r"jobs.toml:1: invalid job name 'Daily'"),
    ('[jobs."a b"]\nbackup_vm = "b"\ninclude = ["w"]\n', r"jobs.toml:1: invalid job name 'a b'"),
    ('jobs = 3\n', r"jobs.toml:1: 'jobs' must be a table"),
    ('jobs.daily = 3\n', r"job 'daily' must be a table"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = ["w"]\nlive = "yes"\n',
     r"jobs.toml:4: job 'daily': live must be a boolean \(true or false\)"),
    ('[jobs.daily]\nbackup_vm = "b"\ninclude = ["w"]\nlive = 1\n', r"live must be a boolean"),
])
def test_wrong_files_give_one_line_naming_the_line(text, message):
    with pytest.raises(jobs.JobError, match=message) as err:
        jobs.parse_jobs(text, "jobs.toml")
    assert "\n" not in str(err.value)


def test_hostile_files(tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_bytes(b'[jobs.daily]\nbackup_vm = "b"\n# \xff\xfe\n')
    with pytest.raises(jobs.JobError, match=r"jobs.toml:3: not UTF-8"):
        jobs.load_jobs(str(path))
    path.write_bytes(b"#" * (jobs.MAX_FILE + 1))
    with pytest.raises(jobs.JobError, match="larger than"):
        jobs.load_jobs(str(path))
    path.write_text("[jobs.a]\n" + "x = [" * 2000)  # deep nesting: a parse error, no crash
    with pytest.raises(jobs.JobError):
        jobs.load_jobs(str(path))
    assert jobs.load_jobs(str(tmp_path / "missing.toml")) == {}
    with pytest.raises(jobs.JobError, match=r"no job 'daily' \(jobs: none"):
        jobs.get_job("daily", str(tmp_path / "missing.toml"))


# -- selection and review ------------------------------------------------------

def vol(name, *, size=1 << 30, usage=1 << 28, path="/img", unreadable="", live_path=None):
    return VolumeInfo(name=name, pool="p", size=size, path=None if unreadable else path,
                      rw=True, save_on_stop=True, snap_on_start=False, revisions_to_keep=1,
                      unreadable=unreadable, usage=usage, live_path=live_path)


def qube(name, klass="AppVM", tags=(), running=False, volumes=None, **properties):
    return QubeInfo(name=name, klass=klass, properties=properties, tags=sorted(tags),
                    running=running,
                    volumes=volumes if volumes is not None else {"private": vol("private")})


SYSTEM = [
    qube("fedora", "TemplateVM", volumes={"root": vol("root"), "private": vol("private")}),
    qube("sys-net", netvm=None, template="fedora"),
    qube("sys-firewall", netvm="sys-net", template="fedora"),
    qube("work", tags=["backup"], netvm="sys-firewall", template="fedora"),
    qube("vault", tags=["backup", "nobackup"], template="fedora"),
    qube("personal", template="fedora"),
    qube("sys-backup", tags=["backup"], template="fedora"),
]


def job(**kw):
    return jobs.Job(**{"name": "daily", "backup_vm": "sys-backup", "repo": "daily",
                       "include": ("@tag:backup",), **kw})


def test_selection_and_reasons():
    sel = jobs.select(job(include=("work", "@tag:backup", "@type:TemplateVM"),
                          exclude=("@tag:nobackup",)), SYSTEM)
    assert sel.included == {"fedora": "@type:TemplateVM", "work": "named"}
    assert sel.not_included == {
        "personal": "not selected", "sys-backup": "the backup qube (it holds the repository)",
        "sys-firewall": "not selected", "sys-net": "not selected",
        "vault": "excluded by @tag:nobackup"}
    everything = jobs.select(job(include=("@all",), exclude=("personal",)), SYSTEM)
    assert sorted(everything.included) == ["fedora", "sys-firewall", "sys-net", "vault", "work"]
    assert everything.not_included["personal"] == "excluded by personal"


def test_a_clean_job_has_no_warning_or_error():
    result = jobs.review(job(include=("@all",), exclude=("personal", "vault")), SYSTEM)
    assert (result.errors, result.warnings) == ([], [])
    assert result.volumes == 5 and result.bytes_total == 5 << 30
    assert result.bytes_used == 5 << 28


@pytest.mark.parametrize("system, kw, warning", [
    (SYSTEM, {"include": ("work",)},
     "work uses sys-firewall as its netvm, which the job does not include"),
    (SYSTEM, {"include": ("work",)}, "work uses fedora as its template, which the job"),
    ([*SYSTEM, qube("dvmuser", default_dispvm="dvm"), qube("dvm")],
     {"include": ("dvmuser",)}, "dvmuser uses dvm as its default_dispvm"),
    ([*SYSTEM, qube("mgmt", management_dispvm="default-mgmt-dvm")],
     {"include": ("mgmt",)}, "mgmt uses default-mgmt-dvm as its management_dispvm"),
    ([*SYSTEM, qube("a", audiovm="sys-audio", guivm="sys-gui")], {"include": ("a",)},
     "a uses sys-audio as its audiovm"),
    ([*SYSTEM, qube("a", audiovm="sys-audio", guivm="sys-gui")], {"include": ("a",)},
     "a uses sys-gui as its guivm"),
    ([*SYSTEM, qube("busy", running=True)], {"include": ("busy",)},
     "busy is running: it is backed up as it was at its last shutdown"),
    (SYSTEM, {"include": ("work", "@tag:nosuch")}, "include rule @tag:nosuch matches no qube"),
    (SYSTEM, {"include": ("work",), "exclude": ("@type:StandaloneVM",)},
     "exclude rule @type:StandaloneVM matches no qube"),
])
def test_each_warning(system, kw, warning):
    result = jobs.review(job(**kw), system)
    assert result.errors == []
    assert any(w.startswith(warning) for w in result.warnings), result.warnings


def test_what_check_says_of_a_running_qube():
    """Without live: the last-shutdown state, and that what it wrote since
    is left out; with live: which volumes are copied live, and which (no
    live copy in their pool) as at the last shutdown."""
    dirty = {"private": vol("private", live_path="/pool/appvms/busy/private-dirty.img"),
             "root": vol("root", live_path="/pool/appvms/busy/root-dirty.img")}
    system = [*SYSTEM, qube("busy", "StandaloneVM", running=True, volumes=dirty),
              qube("plain", "StandaloneVM", running=True,
                   volumes={"private": dirty["private"], "root": vol("root")}),
              qube("halted", volumes={"private": dirty["private"]})]
    [shutdown] = jobs.review(job(include=("busy",)), system).warnings
    assert shutdown == ("busy is running: it is backed up as it was at its last shutdown, "
                        "without what it wrote since (live = true backs up a crash-consistent "
                        "copy of that)")
    [live] = jobs.review(job(include=("busy",), live=True), system).warnings
    assert live == ("busy is running: private, root backed up live: a crash-consistent copy "
                    "of what it has written so far, as after a power cut")
    [mixed] = jobs.review(job(include=("plain",), live=True), system).warnings
    assert mixed == ("plain is running: private backed up live: a crash-consistent copy of "
                     "what it has written so far, as after a power cut; root as it was at "
                     "its last shutdown (its pool has no live copy)")
    assert jobs.review(job(include=("halted",), live=True), system).warnings == []


def test_dom0_and_included_dependencies_are_no_warning():
    result = jobs.review(job(include=("fedora", "sys-net", "sys-firewall", "work"),
                             exclude=()), [*SYSTEM, qube("x", guivm="dom0")])
    assert result.warnings == []


@pytest.mark.parametrize("system, kw, error", [
    (SYSTEM, {"backup_vm": "nosuch"}, "backup qube nosuch does not exist"),
    (SYSTEM, {"include": ("work", "ghost")}, "include names ghost, which does not exist"),
    (SYSTEM, {"include": ("work",), "exclude": ("ghost",)},
     "exclude names ghost, which does not exist"),
    (SYSTEM, {"include": ("sys-backup", "work")}, "the job includes its own backup qube"),
    (SYSTEM, {"include": ("@tag:none",)}, "the job includes no qube"),
    ([*SYSTEM, qube("legacy", volumes={"private": vol("private", unreadable="it is in a pool "
                                                        "of the legacy 'file' driver")})],
     {"include": ("legacy",)},
     "legacy: volume private cannot be read: it is in a pool of the legacy 'file' driver"),
])
def test_each_error(system, kw, error):
    result = jobs.review(job(**kw), system)
    assert any(e.startswith(error) for e in result.errors), result.errors


def test_passphrase_file_must_be_root_only(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    os.chmod(pw, 0o600)
    if os.geteuid() == 0:
        jobs.check_passphrase_file(str(pw))  # root's, 0600: fine
        os.chmod(pw, 0o400)
        jobs.check_passphrase_file(str(pw))
    os.chmod(pw, 0o640)
    with pytest.raises(jobs.JobError, match="must be owned by root with mode 0600 or 0400"):
        jobs.check_passphrase_file(str(pw))
    link = tmp_path / "link"
    link.symlink_to(pw)
    with pytest.raises(jobs.JobError, match="is not a regular file"):
        jobs.check_passphrase_file(str(link))
    with pytest.raises(jobs.JobError, match="No such file"):
        jobs.check_passphrase_file(str(tmp_path / "missing"))
    result = jobs.review(job(include=("work",), passphrase_file=str(link)), SYSTEM)
    assert any("is not a regular file" in e for e in result.errors)


# -- job locks -----------------------------------------------------------------

def test_a_running_job_holds_its_lock(tmp_path):
    run_dir = str(tmp_path / "run")
    assert not job_running(run_dir, "daily")
    with job_lock(run_dir, "daily"):
        assert job_running(run_dir, "daily")
        assert not job_running(run_dir, "weekly")
        with pytest.raises(QbackupError, match="job daily is already running"):
            with job_lock(run_dir, "daily"):
                pass
        # another process sees it too, with read access only
        code = ("import sys; from qbackup.commands.jobs import job_running; "
                f"sys.exit(0 if job_running({run_dir!r}, 'daily') else 1)")
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert not job_running(run_dir, "daily")
    assert oct(os.stat(tmp_path / "run/jobs/daily.lock").st_mode & 0o777) == "0o644"


# -- qubes.BackupRequest ---------------------------------------------------------

@pytest.fixture
def jobs_file(tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text(GOOD)
    return str(path)


def ask(jobs_file, run_dir, source="sys-backup", argument="daily", started=None):
    env = {"QREXEC_REMOTE_DOMAIN": source}
    if argument is not None:
        env["QREXEC_SERVICE_ARGUMENT"] = argument
    started = [] if started is None else started
    return request.handle(env, jobs_file=jobs_file, run_dir=run_dir, start=started.append)


def test_request_starts_the_job(jobs_file, tmp_path):
    started = []
    assert ask(jobs_file, str(tmp_path), started=started) == (
        0, "started job daily; its outcome is in dom0 (qbackup status)")
    assert started == ["daily"]


@pytest.mark.parametrize("argument", [None, "", "../daily", "Daily", "daily weekly", "daily\n",
                                      "dai\x00ly", "x" * 33, "dailý", "-daily", "daily;id",
                                      "$(id)"])
def test_request_refuses_every_bad_argument(jobs_file, tmp_path, argument):
    started = []
    code, line = ask(jobs_file, str(tmp_path), argument=argument, started=started)
    assert code == 1 and line.startswith("refused: the argument must be a job name")
    assert started == []


@pytest.mark.parametrize("source", ["", "dom0", "bad name", "x" * 40])
def test_request_refuses_a_bad_source(jobs_file, tmp_path, source):
    assert ask(jobs_file, str(tmp_path), source=source)[1] == "refused: no calling qube"


def test_request_only_for_the_jobs_own_backup_qube(jobs_file, tmp_path):
    started = []
    assert ask(jobs_file, str(tmp_path), source="work", started=started) == (
        1, "refused: no job daily for work")
    assert ask(jobs_file, str(tmp_path), argument="monthly", started=started) == (
        1, "refused: no job monthly for sys-backup")
    assert started == []


def test_request_is_refused_while_the_job_runs(jobs_file, tmp_path):
    started = []
    with job_lock(str(tmp_path), "daily"):
        assert ask(jobs_file, str(tmp_path), started=started) == (
            1, "refused: job daily is running")
    assert started == []


def test_request_with_a_broken_jobs_file_or_a_failed_start(tmp_path):
    broken = tmp_path / "jobs.toml"
    broken.write_text("[jobs.daily\n")
    assert ask(str(broken), str(tmp_path))[1].startswith("refused: dom0's jobs file is broken")

    def fail(_name):
        raise subprocess.CalledProcessError(1, "systemctl")
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    env = {"QREXEC_REMOTE_DOMAIN": "sys-backup", "QREXEC_SERVICE_ARGUMENT": "daily"}
    assert request.handle(env, jobs_file=str(good), run_dir=str(tmp_path), start=fail) == (
        1, "refused: dom0 could not start job daily")


def test_the_service_script(tmp_path, jobs_file):
    """qubes-rpc/qubes.BackupRequest as qrexec runs it: the argument in the
    environment, one line on stdout. (Its default jobs file does not exist
    here, so the request is refused.)"""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "qubes-rpc",
                          "qubes.BackupRequest")
    proc = subprocess.run([sys.executable, script, "daily"], capture_output=True, text=True,
                          env={**os.environ, "QREXEC_REMOTE_DOMAIN": "sys-backup",
                               "QREXEC_SERVICE_ARGUMENT": "daily"}, timeout=60)
    assert proc.returncode == 1 and proc.stdout == "refused: no job daily for sys-backup\n"
    assert "qubes.BackupRequest from 'sys-backup'" in proc.stderr


def test_lock_file_cannot_be_a_planted_symlink(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "jobs").mkdir(parents=True)
    (run_dir / "jobs" / "daily.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(QbackupError, match="cannot create the lock of job daily"):
        with job_lock(str(run_dir), "daily"):
            pass
    assert not (tmp_path / "elsewhere").exists()
