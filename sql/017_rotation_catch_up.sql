-- A rotation whose run an application wrote behind under the old key (it
-- encrypts with the current key until the new one is promoted) promotes
-- over those values and rotates them in a catch-up run after promotion:
-- true from that promotion until a catch-up run and a verify leave none.
ALTER TABLE rekey.rotations ADD COLUMN catch_up_due boolean NOT NULL DEFAULT false;
