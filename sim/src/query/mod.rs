//! The IoT Hub query language, the subset the emulator serves (PROTOCOL §14.1):
//! `SELECT [TOP n] * | path [AS name], ... | COUNT() [AS name] FROM devices.modules
//! [WHERE cond] [GROUP BY path, ...]`, conditions with `= != <> < > <= >= AND OR NOT IN NIN`,
//! parentheses and `IS_DEFINED(path)`, string/number/bool/null literals, and paths into
//! the twin document (`tags.x`, `properties.reported.x`, `configurations.[[id]].status`,
//! `deviceId`, `moduleId`, ...).
//!
//! Pure: [`parse`] turns text into a [`Query`] or a [`QueryError`] naming the position and
//! token; [`Query::run`] evaluates it over twin documents (JSON as the hub returns them).
//! Used by `POST /devices/query` and by configurations (target conditions, metrics).

mod eval;
mod lexer;
mod parser;

pub use eval::lookup;

/// Longest query the hub accepts, in characters.
pub const MAX_QUERY_CHARS: usize = 8192;

/// Why a query text is not a query: where (1-based character position) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("syntax error at position {position}: {message}")]
pub struct QueryError {
    pub position: usize,
    pub message: String,
}

impl QueryError {
    pub fn new(position: usize, message: impl Into<String>) -> Self {
        QueryError {
            position,
            message: message.into(),
        }
    }
}

/// The collection a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    /// `FROM devices`: device twins (identity fields only; the emulator keeps no device
    /// twin properties).
    Devices,
    /// `FROM devices.modules`: module twins.
    Modules,
}

/// A property path, segments as written (`[[id]]` segments without the brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(pub Vec<String>);

impl Path {
    /// The name a projection gives the value: its last segment.
    pub fn last(&self) -> &str {
        self.0.last().map(String::as_str).unwrap_or("")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Path(Path),
    Lit(Literal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Compare(Operand, CmpOp, Operand),
    In {
        operand: Operand,
        list: Vec<Literal>,
        negated: bool,
    },
    IsDefined(Path),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum SelectItem {
    Path { path: Path, alias: Option<String> },
    Count { alias: Option<String> },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    All,
    Items(Vec<SelectItem>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub select: Select,
    pub top: Option<usize>,
    pub from: Collection,
    pub filter: Option<Expr>,
    pub group_by: Vec<Path>,
}

/// What rows a query yields, which the hub names in `x-ms-item-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemType {
    /// Whole twin documents (`SELECT *`).
    Twin,
    /// Projections and aggregates.
    Raw,
}

impl ItemType {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemType::Twin => "twin",
            ItemType::Raw => "raw",
        }
    }
}

/// Parses a query text.
pub fn parse(text: &str) -> Result<Query, QueryError> {
    let len = text.chars().count();
    if len > MAX_QUERY_CHARS {
        return Err(QueryError::new(
            MAX_QUERY_CHARS + 1,
            format!("the query is {len} characters long; the limit is {MAX_QUERY_CHARS}"),
        ));
    }
    parser::Parser::new(lexer::tokenize(text)?).query()
}

impl Query {
    /// Whether the query returns whole twins or raw rows.
    pub fn item_type(&self) -> ItemType {
        match self.select {
            Select::All => ItemType::Twin,
            Select::Items(_) => ItemType::Raw,
        }
    }

    /// Whether the query aggregates (COUNT() or GROUP BY): its rows are not twins.
    pub fn aggregates(&self) -> bool {
        !self.group_by.is_empty()
            || matches!(&self.select, Select::Items(items)
                if items.iter().any(|i| matches!(i, SelectItem::Count { .. })))
    }

    /// Checks what the grammar cannot: a query that counts projects only what it groups by.
    fn check_shape(&self) -> Result<(), QueryError> {
        let Select::Items(items) = &self.select else {
            if !self.group_by.is_empty() {
                return Err(QueryError::new(
                    1,
                    "SELECT * cannot be combined with GROUP BY",
                ));
            }
            return Ok(());
        };
        if !self.aggregates() {
            return Ok(());
        }
        for item in items {
            if let SelectItem::Path { path, .. } = item {
                if !self.group_by.contains(path) {
                    return Err(QueryError::new(
                        1,
                        format!(
                            "'{}' is projected beside COUNT() but is not in GROUP BY",
                            path.0.join(".")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
