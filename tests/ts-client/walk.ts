// Walks every route of the Todo API through a client generated from its own /openapi.json
// (openapi-typescript + openapi-fetch), the way a Next.js frontend would. It compiles under
// `strict` with no `any` and no casts: if the document's types were wrong (an optional field
// the server always sends, a nullable one it refuses), this file would not compile or its
// checks would fail. Run by tests/generated_client.rs: `node build/walk.js BASE_URL`.
import createClient from "openapi-fetch";
import type { components, paths } from "./api.js";

type Task = components["schemas"]["Task"];
type User = components["schemas"]["User"];

const baseUrl = process.argv[2];
if (baseUrl === undefined) {
  throw new Error("usage: node walk.js BASE_URL");
}

function check(condition: boolean, what: string): asserts condition {
  if (!condition) {
    throw new Error(`check failed: ${what}`);
  }
}

const api = createClient<paths>({ baseUrl });
const email = `walker-${Date.now()}@example.com`;
const password = "correct horse battery";

// [health]
{
  const { data, response } = await api.GET("/health");
  check(response.status === 200 && data !== undefined, "GET /health is 200");
  const status: "ok" | "unavailable" = data.status;
  check(status === "ok", "the database answers");
}

// [auth]
let user: User;
{
  const { data, response } = await api.POST("/api/auth/register", {
    body: { email, password, name: "Walker" },
  });
  check(response.status === 201 && data !== undefined, "register is 201");
  user = data;
  // `name` is always sent: typed `string | null`, not optional.
  const name: string | null = user.name;
  check(name === "Walker" && user.email === email, "the new user");
}
{
  const { error, response } = await api.POST("/api/auth/register", {
    body: { email, password },
  });
  check(response.status === 409 && error !== undefined, "a taken email is 409");
  check(error.detail === "Email already registered", "409 detail");
}
let token: string;
{
  // The OAuth2 password form, as Swagger UI's Authorize button sends it; the optional OAuth2
  // fields are in the schema, so a client may send them.
  const { data, response } = await api.POST("/token", {
    body: { username: email, password, grant_type: "password", client_id: "walker" },
    bodySerializer: (body) => {
      const form = new URLSearchParams();
      for (const [name, value] of Object.entries(body)) {
        if (typeof value === "string") {
          form.set(name, value);
        }
      }
      return form;
    },
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
  });
  check(response.status === 200 && data !== undefined, "POST /token is 200");
  const tokenType: "bearer" = data.token_type;
  check(tokenType === "bearer" && data.expires_in > 0, "a bearer token");
  check(response.headers.get("cache-control") === "no-store", "tokens are not cached");
}
{
  const { error, response } = await api.POST("/api/auth/login", {
    body: { email, password: "not the password" },
  });
  check(response.status === 401 && error !== undefined, "a wrong password is 401");
  check(error.detail === "Incorrect email or password", "401 detail");
  check(response.headers.get("www-authenticate") === "Bearer", "401 carries WWW-Authenticate");
}
{
  const { data, response } = await api.POST("/api/auth/login", { body: { email, password } });
  check(response.status === 200 && data !== undefined, "POST /api/auth/login is 200");
  token = data.access_token;
}

const signedIn = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${token}` } });

// [users]
{
  const { error, response } = await api.GET("/api/users/me");
  check(response.status === 401 && error !== undefined, "no token is 401");
  check(error.detail === "Not authenticated", "401 detail");
}
{
  const { data, response } = await signedIn.GET("/api/users/me");
  check(response.status === 200 && data !== undefined && data.id === user.id, "GET /api/users/me");
}
{
  const { data, response } = await signedIn.PATCH("/api/users/me", { body: { name: null } });
  check(response.status === 200 && data !== undefined, "PATCH /api/users/me is 200");
  check(data.name === null && data.email === email, "`name: null` clears the name");
}
{
  // @ts-expect-error `email` may be left out but is not nullable: the server answers 422.
  const { error, response } = await signedIn.PATCH("/api/users/me", { body: { email: null } });
  check(response.status === 422 && error !== undefined, "`email: null` is 422");
}
{
  const { error, response } = await signedIn.PUT("/api/users/me/password", {
    body: { current_password: "wrong password", new_password: "another horse battery" },
  });
  check(response.status === 400 && error !== undefined, "a wrong current password is 400");
  check(error.detail === "Incorrect password", "400 detail");
}
{
  const { response } = await signedIn.PUT("/api/users/me/password", {
    body: { current_password: password, new_password: "another horse battery" },
  });
  check(response.status === 204, "PUT /api/users/me/password is 204");
  // Tokens issued before the change may stop working: log in again with the new password.
}
{
  const { data, response } = await api.POST("/api/auth/login", {
    body: { email, password: "another horse battery" },
  });
  check(response.status === 200 && data !== undefined, "the new password works");
  token = data.access_token;
}
const tasksClient = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${token}` } });

// [tasks]
const me = { user_id: "me" };
let task: Task;
{
  const { data, response } = await tasksClient.POST("/api/{user_id}/tasks", {
    params: { path: me },
    body: { title: "Buy milk" },
  });
  check(response.status === 201 && data !== undefined, "POST task is 201");
  task = data;
  // `description` is always sent: typed `string | null`, not optional.
  const description: string | null = task.description;
  check(description === null && task.completed === false, "the defaults");
  check(
    response.headers.get("location") === `/api/${user.id}/tasks/${task.id}`,
    "Location names the new task",
  );
}
{
  const { data, response } = await tasksClient.GET("/api/{user_id}/tasks", {
    params: {
      path: me,
      query: { status: "all", sort: "created", order: "desc", q: "milk", limit: 10, offset: 0 },
    },
  });
  check(response.status === 200 && data !== undefined, "GET tasks is 200");
  check(data.length === 1 && data[0]?.id === task.id, "the task is listed");
  check(response.headers.get("x-total-count") === "1", "X-Total-Count");
}
{
  const { error, response } = await tasksClient.GET("/api/{user_id}/tasks", {
    params: { path: { user_id: "someone-else" } },
  });
  check(response.status === 403 && error !== undefined, "another user's tasks are 403");
  check(error.detail === "Not allowed to access another user's tasks", "403 detail");
}
{
  const { error, response } = await tasksClient.POST("/api/{user_id}/tasks", {
    params: { path: me },
    body: { title: "" },
  });
  check(response.status === 422 && error !== undefined, "an empty title is 422");
  check(Array.isArray(error.detail) && error.detail.length === 1, "one problem listed");
}
{
  const { data, response } = await tasksClient.GET("/api/{user_id}/tasks/{id}", {
    params: { path: { ...me, id: task.id } },
  });
  check(response.status === 200 && data !== undefined && data.title === "Buy milk", "GET task");
}
{
  const { data, response } = await tasksClient.PUT("/api/{user_id}/tasks/{id}", {
    params: { path: { ...me, id: task.id } },
    body: { title: "Buy oat milk", description: "2 litres", completed: false },
  });
  check(response.status === 200 && data !== undefined, "PUT task is 200");
  check(data.title === "Buy oat milk" && data.description === "2 litres", "PUT replaces");
}
{
  const { data, response } = await tasksClient.PATCH("/api/{user_id}/tasks/{id}", {
    params: { path: { ...me, id: task.id } },
    body: { description: null, completed: true },
  });
  check(response.status === 200 && data !== undefined, "PATCH task is 200");
  check(data.description === null && data.completed && data.title === "Buy oat milk", "PATCH");
}
{
  const { error, response } = await tasksClient.PATCH("/api/{user_id}/tasks/{id}", {
    params: { path: { ...me, id: task.id } },
    // @ts-expect-error `title` may be left out but is not nullable: the server answers 422.
    body: { title: null },
  });
  check(response.status === 422 && error !== undefined, "`title: null` is 422");
}
{
  const { data, response } = await tasksClient.PATCH("/api/{user_id}/tasks/{id}/complete", {
    params: { path: { ...me, id: task.id } },
  });
  check(response.status === 200 && data !== undefined && !data.completed, "toggle");
}
{
  const { response } = await tasksClient.DELETE("/api/{user_id}/tasks/{id}", {
    params: { path: { ...me, id: task.id } },
  });
  check(response.status === 204, "DELETE task is 204");
}
{
  const { error, response } = await tasksClient.GET("/api/{user_id}/tasks/{id}", {
    params: { path: { ...me, id: task.id } },
  });
  check(response.status === 404 && error !== undefined, "a deleted task is 404");
  check(error.detail === "Task not found", "404 detail");
}

// The account goes last.
{
  const { response } = await tasksClient.DELETE("/api/users/me");
  check(response.status === 204, "DELETE /api/users/me is 204");
  const after = await tasksClient.GET("/api/users/me");
  check(after.response.status === 401, "a deleted account's token is 401");
}

console.log("walked every route");
