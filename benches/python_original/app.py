"""A minimal stand-in for the Python original (FastAPI + SQLModel + PyJWT + bcrypt).

Only what benches/run.sh exercises: register, login (JSON and the OAuth2 form on /token),
users/me, list, create and read one task, toggle a task's completion.
Written the way such an app usually is: sync endpoints (FastAPI runs them in its thread
pool), one SQLModel Session per request through a Depends, and a get_current_user
dependency that decodes the JWT and loads the user from the database on every request.

Environment:
  DATABASE_URL     sqlite:///path/to/file.db (default sqlite:///./todo.db) or postgresql+psycopg://...
  JWT_SECRET       HS256 key (required)
  ACCESS_TOKEN_EXPIRE_MINUTES  default 30
  BENCH_SQLITE_WAL if "1", switch SQLite to WAL + synchronous=NORMAL (what the Rust server
                   does); off by default, since the typical app keeps SQLite's defaults.

Run: uvicorn app:app   (one worker, as `uvicorn app:app` / `fastapi run` do by default)
"""

import os
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Annotated

import bcrypt
import jwt
from fastapi import Depends, FastAPI, HTTPException, Query, Response, status
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from pydantic import EmailStr
from sqlalchemy import event
from sqlmodel import Field, Session, SQLModel, create_engine, func, select

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///./todo.db")
JWT_SECRET = os.environ["JWT_SECRET"]
ALGORITHM = "HS256"
ACCESS_TOKEN_EXPIRE_MINUTES = int(os.environ.get("ACCESS_TOKEN_EXPIRE_MINUTES", "30"))

is_sqlite = DATABASE_URL.startswith("sqlite")
connect_args = {"check_same_thread": False} if is_sqlite else {}
engine = create_engine(DATABASE_URL, connect_args=connect_args)

if is_sqlite:

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if os.environ.get("BENCH_SQLITE_WAL") == "1":
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ---- models -------------------------------------------------------------------------------


class User(SQLModel, table=True):
    id: str = Field(default_factory=lambda: str(uuid.uuid4()), primary_key=True)
    email: str = Field(index=True, unique=True)
    name: str | None = None
    hashed_password: str
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class UserCreate(SQLModel):
    email: EmailStr
    password: str = Field(min_length=8, max_length=72)
    name: str | None = None


class UserRead(SQLModel):
    id: str
    email: str
    name: str | None
    created_at: datetime
    updated_at: datetime


class LoginRequest(SQLModel):
    email: str
    password: str


class Token(SQLModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


class TaskBase(SQLModel):
    title: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=1000)
    completed: bool = False


class Task(TaskBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="user.id", index=True)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class TaskCreate(TaskBase):
    pass


class TaskRead(TaskBase):
    id: int
    user_id: str
    created_at: datetime
    updated_at: datetime


# ---- app, session, auth -------------------------------------------------------------------


@asynccontextmanager
async def lifespan(_app: FastAPI):
    SQLModel.metadata.create_all(engine)
    yield


app = FastAPI(title="Todo API (Python original, benchmark subset)", lifespan=lifespan)


def get_session():
    with Session(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="token")


def create_access_token(user_id: str) -> str:
    now = utcnow()
    claims = {"sub": user_id, "iat": now, "exp": now + timedelta(minutes=ACCESS_TOKEN_EXPIRE_MINUTES)}
    return jwt.encode(claims, JWT_SECRET, algorithm=ALGORITHM)


def get_current_user(token: Annotated[str, Depends(oauth2_scheme)], session: SessionDep) -> User:
    credentials_exception = HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="Could not validate credentials",
        headers={"WWW-Authenticate": "Bearer"},
    )
    try:
        payload = jwt.decode(token, JWT_SECRET, algorithms=[ALGORITHM])
    except jwt.InvalidTokenError:
        raise credentials_exception
    user_id = payload.get("sub")
    if user_id is None:
        raise credentials_exception
    user = session.get(User, user_id)
    if user is None:
        raise credentials_exception
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def ensure_owner(user_id: str, current_user: User) -> None:
    if user_id != current_user.id:
        raise HTTPException(status_code=403, detail="Not allowed to access another user's tasks")


# ---- routes -------------------------------------------------------------------------------


@app.post("/api/auth/register", response_model=UserRead, status_code=201, tags=["auth"])
def register(data: UserCreate, session: SessionDep):
    email = data.email.strip().lower()
    if session.exec(select(User).where(User.email == email)).first():
        raise HTTPException(status_code=409, detail="Email already registered")
    hashed = bcrypt.hashpw(data.password.encode(), bcrypt.gensalt()).decode()
    user = User(email=email, name=data.name, hashed_password=hashed)
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def authenticate(session: Session, email: str, password: str, response: Response) -> Token:
    user = session.exec(select(User).where(User.email == email.strip().lower())).first()
    if not user or not bcrypt.checkpw(password.encode(), user.hashed_password.encode()):
        raise HTTPException(
            status_code=401,
            detail="Incorrect email or password",
            headers={"WWW-Authenticate": "Bearer"},
        )
    response.headers["Cache-Control"] = "no-store"
    return Token(access_token=create_access_token(user.id), expires_in=ACCESS_TOKEN_EXPIRE_MINUTES * 60)


@app.post("/api/auth/login", response_model=Token, tags=["auth"])
def login(data: LoginRequest, session: SessionDep, response: Response):
    return authenticate(session, data.email, data.password, response)


@app.post("/token", response_model=Token, tags=["auth"])
def token(form: Annotated[OAuth2PasswordRequestForm, Depends()], session: SessionDep, response: Response):
    return authenticate(session, form.username, form.password, response)


@app.get("/api/users/me", response_model=UserRead, tags=["users"])
def read_me(current_user: CurrentUser):
    return current_user


@app.get("/api/{user_id}/tasks", response_model=list[TaskRead], tags=["tasks"])
def list_tasks(
    user_id: str,
    response: Response,
    current_user: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
):
    ensure_owner(user_id, current_user)
    total = session.exec(select(func.count()).select_from(Task).where(Task.user_id == current_user.id)).one()
    tasks = session.exec(
        select(Task)
        .where(Task.user_id == current_user.id)
        .order_by(Task.created_at.desc(), Task.id.desc())
        .offset(offset)
        .limit(limit)
    ).all()
    response.headers["X-Total-Count"] = str(total)
    return tasks


@app.post("/api/{user_id}/tasks", response_model=TaskRead, status_code=201, tags=["tasks"])
def create_task(user_id: str, data: TaskCreate, response: Response, current_user: CurrentUser, session: SessionDep):
    ensure_owner(user_id, current_user)
    title = data.title.strip()
    if not title:
        raise HTTPException(status_code=422, detail=[{"loc": ["body", "title"], "msg": "empty title", "type": "value_error"}])
    task = Task(title=title, description=data.description, completed=data.completed, user_id=current_user.id)
    session.add(task)
    session.commit()
    session.refresh(task)
    response.headers["Location"] = f"/api/{user_id}/tasks/{task.id}"
    return task


def owned_task(session: Session, task_id: int, current_user: User) -> Task:
    task = session.get(Task, task_id)
    if task is None or task.user_id != current_user.id:
        raise HTTPException(status_code=404, detail="Task not found")
    return task


@app.get("/api/{user_id}/tasks/{task_id}", response_model=TaskRead, tags=["tasks"])
def read_task(user_id: str, task_id: int, current_user: CurrentUser, session: SessionDep):
    ensure_owner(user_id, current_user)
    return owned_task(session, task_id, current_user)


@app.patch("/api/{user_id}/tasks/{task_id}/complete", response_model=TaskRead, tags=["tasks"])
def toggle_task(user_id: str, task_id: int, current_user: CurrentUser, session: SessionDep):
    ensure_owner(user_id, current_user)
    task = owned_task(session, task_id, current_user)
    task.completed = not task.completed
    task.updated_at = utcnow()
    session.add(task)
    session.commit()
    session.refresh(task)
    return task
