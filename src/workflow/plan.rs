//! `submit_plan`: parse and validate a plan (unique ids, known dependencies, no cycle).

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use weldr_storage::workflow::{Plan, PlanTask};

use crate::llm::ToolSpec;
use crate::llm::schema::tool_schema;

/// The input of `submit_plan`. The schema asks for every field the model should fill in; the
/// parser still takes a plan or task without the lists and the description (empty).
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("required" = ["acceptanceCriteria", "tasks"]))]
struct PlanInput {
    /// What must hold when the whole plan is done.
    #[serde(default)]
    acceptance_criteria: Vec<String>,
    /// The tasks, each done in turn once the tasks it depends on are done.
    tasks: Vec<TaskInput>,
}

/// One task of a plan.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend(
    "required" = ["id", "summary", "description", "acceptanceCriteria", "dependencies"]
))]
struct TaskInput {
    /// A number unique in the plan.
    id: u64,
    /// One line that says what the task does.
    summary: String,
    /// What to do, in enough detail to do it.
    #[serde(default)]
    description: String,
    /// What must hold when the task is done.
    #[serde(default)]
    acceptance_criteria: Vec<String>,
    /// Ids of the tasks that must be done first.
    #[serde(default)]
    dependencies: Vec<u64>,
    /// Steps of the task.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    sub_tasks: Vec<Value>,
    /// Hints for whoever implements the task.
    #[serde(default)]
    implementation_notes: Option<String>,
}

/// The input of `done` (the engine reads none of it; the summary is for the transcript).
#[derive(Deserialize, JsonSchema)]
pub struct DoneInput {
    /// What was done.
    pub summary: Option<String>,
}

pub fn submit_plan_spec() -> ToolSpec {
    ToolSpec {
        name: "submit_plan".into(),
        description: "Submit the implementation plan: acceptance criteria and tasks; a task's \
                      dependencies are ids of tasks that must be done first."
            .into(),
        input_schema: tool_schema::<PlanInput>(),
    }
}

/// The input of `add_integrations`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct AddIntegrationsInput {
    /// Integration keys: `orpc` (backend), `tanstack-start` (frontend), `postgresql`
    /// (database, needs orpc), `better-auth` (authentication, needs orpc and postgresql).
    pub keys: Vec<String>,
}

pub fn add_integrations_spec() -> ToolSpec {
    ToolSpec {
        name: "add_integrations".into(),
        description: "Planning only: add project integrations (a backend, frontend, database or \
                      authentication template with its dependencies) to the branch. They are \
                      installed, each as its own version, before coding starts."
            .into(),
        input_schema: tool_schema::<AddIntegrationsInput>(),
    }
}

pub fn done_spec() -> ToolSpec {
    ToolSpec {
        name: "done".into(),
        description: "Call when the current task is finished and its acceptance criteria hold."
            .into(),
        input_schema: tool_schema::<DoneInput>(),
    }
}

/// The plan in `input`, or the error the model must fix.
pub fn parse_plan(input: &Value) -> Result<Plan, String> {
    let raw: PlanInput =
        serde_json::from_value(input.clone()).map_err(|e| format!("invalid plan: {e}"))?;
    if raw.tasks.is_empty() {
        return Err("a plan needs at least one task".into());
    }
    let plan = Plan {
        acceptance_criteria: raw.acceptance_criteria,
        tasks: raw
            .tasks
            .into_iter()
            .map(|t| PlanTask {
                id: t.id,
                summary: t.summary,
                description: t.description,
                acceptance_criteria: t.acceptance_criteria,
                dependencies: t.dependencies,
                sub_tasks: t
                    .sub_tasks
                    .into_iter()
                    .map(|s| match s {
                        Value::String(s) => s,
                        other => other.to_string(),
                    })
                    .collect(),
                implementation_notes: t.implementation_notes,
            })
            .collect(),
    };
    order(&plan)?;
    Ok(plan)
}

/// Task ids in dependency order (a stable topological sort), or what is wrong.
pub fn order(plan: &Plan) -> Result<Vec<u64>, String> {
    let ids: Vec<u64> = plan.tasks.iter().map(|t| t.id).collect();
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            return Err(format!("task id {id} is used twice"));
        }
    }
    for t in &plan.tasks {
        for d in &t.dependencies {
            if !ids.contains(d) {
                return Err(format!("task {} depends on unknown task {d}", t.id));
            }
        }
    }
    let mut done: Vec<u64> = Vec::new();
    while done.len() < ids.len() {
        let next = plan
            .tasks
            .iter()
            .find(|t| !done.contains(&t.id) && t.dependencies.iter().all(|d| done.contains(d)));
        match next {
            Some(t) => done.push(t.id),
            None => {
                let stuck: Vec<String> = ids
                    .iter()
                    .filter(|i| !done.contains(i))
                    .map(u64::to_string)
                    .collect();
                return Err(format!(
                    "the dependencies form a cycle among tasks {}",
                    stuck.join(", ")
                ));
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(deps: &[(u64, &[u64])]) -> Value {
        json!({"acceptanceCriteria": [], "tasks": deps.iter().map(|(id, d)| json!({
            "id": id, "summary": "s", "description": "d", "acceptanceCriteria": [], "dependencies": d
        })).collect::<Vec<_>>()})
    }

    #[test]
    fn orders_and_refuses_cycles_and_unknown_dependencies() {
        let p = parse_plan(&plan(&[(1, &[2]), (2, &[]), (3, &[1, 2])])).unwrap();
        assert_eq!(order(&p).unwrap(), vec![2, 1, 3]);
        assert!(
            parse_plan(&plan(&[(1, &[2]), (2, &[1])]))
                .unwrap_err()
                .contains("cycle")
        );
        assert!(
            parse_plan(&plan(&[(1, &[9])]))
                .unwrap_err()
                .contains("unknown")
        );
        assert!(parse_plan(&plan(&[])).is_err());
    }
}
