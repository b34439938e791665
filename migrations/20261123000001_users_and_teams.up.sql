-- Users, teams and team membership.
--
-- Users are soft-deleted: `deleted_at` is set and the row stays for audit and
-- referential integrity. Uniqueness of email and username therefore holds
-- among live users only (partial unique indexes), compared case-insensitively,
-- so a deleted user's email can be registered again.

CREATE TABLE users (
    id            BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email         TEXT        NOT NULL CHECK (char_length(email) BETWEEN 3 AND 254),
    username      TEXT        NOT NULL CHECK (char_length(username) BETWEEN 3 AND 32),
    display_name  TEXT        NOT NULL DEFAULT '' CHECK (char_length(display_name) <= 100),
    status        TEXT        NOT NULL DEFAULT 'active'
                              CONSTRAINT users_status_check CHECK (status IN ('active', 'inactive', 'suspended')),
    -- Argon2id PHC string; never returned by the API and never logged.
    password_hash TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at    TIMESTAMPTZ,
    -- Optimistic concurrency: every change increments it.
    version       BIGINT      NOT NULL DEFAULT 1
);

CREATE UNIQUE INDEX users_email_live_key ON users (lower(email)) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX users_username_live_key ON users (lower(username)) WHERE deleted_at IS NULL;
-- Keyset paging of live users, with and without a status filter.
CREATE INDEX users_live_created_idx ON users (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX users_live_status_created_idx ON users (status, created_at, id) WHERE deleted_at IS NULL;

CREATE TABLE teams (
    id         BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX teams_name_key ON teams (lower(name));

CREATE TABLE user_teams (
    team_id   BIGINT      NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id   BIGINT      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role      TEXT        NOT NULL DEFAULT 'member'
                          CONSTRAINT user_teams_role_check CHECK (role IN ('member', 'maintainer', 'owner')),
    joined_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT user_teams_pkey PRIMARY KEY (team_id, user_id)
);

-- The primary key serves lookups by team; this one serves "teams of a user"
-- in join order, and the foreign key on user_id.
CREATE INDEX user_teams_user_joined_idx ON user_teams (user_id, joined_at, team_id);
