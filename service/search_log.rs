//! The search log writer: every SearchProducts call is recorded in
//! `product_searches`, off the response path.
//!
//! A call hands its record to a bounded channel with `try_send` and returns;
//! one background task drains the channel into batches of up to
//! `batch_size` rows, each written with one INSERT, at least every
//! `flush_interval`. Memory is bounded by `buffer` + `batch_size` records:
//! while the database is slow the channel fills, and further records are
//! dropped and counted (`search_log_dropped_total{reason="buffer_full"}`),
//! never waited for. A batch that fails is retried with backoff, then
//! dropped and counted (`reason="write_failed"`). On shutdown
//! ([`SearchLogWriter::close`]) the channel is closed and everything in it is
//! written before the process exits.

use std::time::Duration;

use sqlx::PgPool;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    config::SearchLogSettings, model::search::SearchRecord, retry, store::search::insert_records,
};

/// The handle searches record through; cheap to clone.
#[derive(Clone)]
pub struct SearchLog {
    sender: mpsc::Sender<SearchRecord>,
}

/// The background task; [`close`](Self::close) it to write what is buffered.
pub struct SearchLogWriter {
    close: CancellationToken,
    task: JoinHandle<()>,
}

impl SearchLog {
    /// Starts the writer task on `db`.
    pub fn start(db: PgPool, settings: &SearchLogSettings) -> (Self, SearchLogWriter) {
        let (sender, receiver) = mpsc::channel(settings.buffer);
        let close = CancellationToken::new();
        let task = tokio::spawn(
            Writer {
                db,
                receiver,
                batch_size: settings.batch_size,
                flush_interval: settings.flush_interval,
            }
            .run(close.clone()),
        );
        (Self { sender }, SearchLogWriter { close, task })
    }

    /// Queues a record without waiting; a full buffer drops it.
    pub fn record(&self, record: SearchRecord) {
        if self.sender.try_send(record).is_err() {
            count_dropped("buffer_full", 1);
        }
    }
}

fn count_dropped(reason: &'static str, n: u64) {
    metrics::counter!("search_log_dropped_total", "reason" => reason).increment(n);
}

impl SearchLogWriter {
    /// Stops taking records and writes every buffered one, waiting at most
    /// `timeout`.
    pub async fn close(self, timeout: Duration) {
        self.close.cancel();
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            tracing::warn!(
                ?timeout,
                "the search log was not written out in time; buffered searches are lost"
            );
        }
    }
}

struct Writer {
    db: PgPool,
    receiver: mpsc::Receiver<SearchRecord>,
    batch_size: usize,
    flush_interval: Duration,
}

impl Writer {
    async fn run(mut self, close: CancellationToken) {
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut ticks = tokio::time::interval(self.flush_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = self.batch_size - batch.len();
            tokio::select! {
                () = close.cancelled() => break,
                received = self.receiver.recv_many(&mut batch, room) => {
                    if received == 0 {
                        break;
                    }
                    if batch.len() >= self.batch_size {
                        self.flush(&mut batch).await;
                    }
                }
                _ = ticks.tick() => self.flush(&mut batch).await,
            }
        }
        // Shutdown: take nothing new, write out everything buffered.
        self.receiver.close();
        while let Some(record) = self.receiver.recv().await {
            batch.push(record);
            if batch.len() >= self.batch_size {
                self.flush(&mut batch).await;
            }
        }
        self.flush(&mut batch).await;
        tracing::info!("search log written out");
    }

    async fn flush(&self, batch: &mut Vec<SearchRecord>) {
        if batch.is_empty() {
            return;
        }
        let written = retry::background("writing the search log", || async {
            let mut conn = self.db.acquire().await?;
            insert_records(&mut conn, batch).await
        })
        .await;
        if let Ok(written) = written {
            metrics::counter!("search_log_written_total").increment(written);
            batch.clear();
            return;
        }
        tracing::error!(
            records = batch.len(),
            "search log batch dropped after repeated failures"
        );
        count_dropped("write_failed", batch.len() as u64);
        batch.clear();
    }
}
