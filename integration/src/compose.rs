//! Brings a docker-compose project up and down (the compose demo), for `cargo xtask demo
//! --compose` and for the scenario that proves the compose file works. Uses `docker compose`
//! where the plugin is installed and `docker-compose` (v1) otherwise; the project is taken down
//! when the handle drops unless it was asked to stay up.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A compose project that is up.
pub struct ComposeProject {
    file: PathBuf,
    name: String,
    env: Vec<(String, String)>,
    down_on_drop: bool,
}

/// The compose command this machine has: the Docker CLI plugin, else the standalone v1 tool.
fn compose_program() -> Vec<&'static str> {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if plugin {
        vec!["docker", "compose"]
    } else {
        vec!["docker-compose"]
    }
}

impl ComposeProject {
    /// `up -d` for `file` as project `name`, with `env` for the file's `${VARIABLES}`.
    pub fn up(file: &Path, name: &str, env: &[(&str, String)]) -> Result<ComposeProject, String> {
        let project = ComposeProject {
            file: file.to_path_buf(),
            name: name.to_owned(),
            env: env
                .iter()
                .map(|(key, value)| ((*key).to_owned(), value.clone()))
                .collect(),
            down_on_drop: true,
        };
        let output = project
            .command(&["up", "--detach"])
            .output()
            .map_err(|error| format!("start {}: {error}", compose_program().join(" ")))?;
        if !output.status.success() {
            let logs = project.logs();
            return Err(format!(
                "{} up failed ({}): {}\n{logs}",
                compose_program().join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(project)
    }

    /// The command line that takes this project down, for a user to run.
    pub fn down_command_line(&self) -> String {
        format!(
            "{} -f {} -p {} down",
            compose_program().join(" "),
            self.file.display(),
            self.name
        )
    }

    /// Leaves the project running when this handle drops.
    pub fn keep_running(mut self) {
        self.down_on_drop = false;
    }

    /// Every service's log so far.
    pub fn logs(&self) -> String {
        self.command(&["logs", "--no-color"])
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default()
    }

    fn command(&self, args: &[&str]) -> Command {
        let program = compose_program();
        let mut command = Command::new(program[0]);
        command
            .args(&program[1..])
            .arg("--file")
            .arg(&self.file)
            .args(["--project-name", &self.name])
            .args(args)
            .stdin(Stdio::null());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if self.down_on_drop {
            let _ = self
                .command(&["down", "--volumes", "--timeout", "5"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
